//! RESP2 and RESP3: the [`Value`] type, its encoder, and an incremental
//! decoder with limits.
//!
//! [`decode`] builds a reply in one pass when all its bytes are there, and
//! returns `Ok(None)` (need more bytes) otherwise. Allocations are bounded
//! by the bytes received: an aggregate's capacity by the bytes behind its
//! header, a bulk string's by its bytes, copied only once all arrived. The
//! streaming [`Decoder`] adds a scanner that walks an incomplete reply
//! without allocating and keeps its place between reads, so a large reply
//! that arrives in many reads is scanned once, not once per read. Both share
//! one validation routine, so they accept and refuse exactly the same bytes.
//!
//! Limits (each breach is an [`Error::Protocol`]):
//! - a bulk string is at most [`MAX_BULK_LEN`] bytes (Redis' `proto-max-bulk-len`);
//! - aggregates nest at most [`MAX_DEPTH`] deep;
//! - integers and lengths fit `i64`; the only negative lengths are the RESP2
//!   nulls `$-1` and `*-1`;
//! - a line (`+`, `-`, `:`, ...) is at most [`MAX_LINE_LEN`] bytes.

use crate::error::{Error, Result};

pub(crate) mod split;
pub(crate) use split::{plain_bulk_header, plain_bulk_or_nil};
pub(crate) use split::{Frame, ReplyStream};

/// Longest bulk string accepted: 512 MiB, Redis' default `proto-max-bulk-len`.
pub const MAX_BULK_LEN: usize = 512 * 1024 * 1024;
/// Deepest nesting of aggregates accepted.
pub const MAX_DEPTH: usize = 128;
/// Longest simple line (simple string, error, number) accepted, CRLF excluded.
pub const MAX_LINE_LEN: usize = 1024 * 1024;

/// A reply from Redis, RESP2 or RESP3.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    /// Null: RESP2 `$-1` / `*-1`, RESP3 `_`.
    Nil,
    /// `:` integer.
    Int(i64),
    /// `$` bulk string: binary safe.
    BulkString(Vec<u8>),
    /// `+` simple string (`OK`, `PONG`, `QUEUED`).
    SimpleString(String),
    /// An error reply (`-` or RESP3 `!`). At the top level the engine turns it
    /// into [`Error::Server`]; as a `Value` it only appears inside aggregates
    /// (e.g. a failed command in an `EXEC` reply).
    Error {
        /// The first word: `ERR`, `WRONGTYPE`, ...
        code: String,
        /// The rest of the text.
        message: String,
    },
    /// `*` array.
    Array(Vec<Value>),
    /// RESP3 `%` map, as ordered pairs.
    Map(Vec<(Value, Value)>),
    /// RESP3 `~` set.
    Set(Vec<Value>),
    /// RESP3 `,` double.
    Double(f64),
    /// RESP3 `#` boolean.
    Boolean(bool),
    /// RESP3 `(` big number, as its decimal text.
    BigNumber(String),
    /// RESP3 `=` verbatim string: a three-letter format (`txt`, `mkd`) and the text.
    Verbatim {
        /// `txt` or `mkd`.
        format: String,
        /// The text.
        text: Vec<u8>,
    },
    /// RESP3 `>` push message (out of band: pub/sub, client tracking).
    Push(Vec<Value>),
    /// RESP3 `|` attribute: metadata the server sent beside a reply, kept
    /// beside it. Conversions look straight through it to `value`.
    Attribute {
        /// The attribute map.
        attributes: Vec<(Value, Value)>,
        /// The reply itself.
        value: Box<Value>,
    },
}

impl Value {
    /// The value of a bulk string read in place (`None`: nil).
    pub(crate) fn from_bulk_bytes(bytes: Option<&[u8]>) -> Value {
        match bytes {
            Some(b) => Value::BulkString(b.to_vec()),
            None => Value::Nil,
        }
    }

    /// The reply without any attribute wrapped around it.
    #[inline]
    #[must_use]
    pub fn strip_attributes(mut self) -> Value {
        // Inlined: every conversion calls this, and almost no value has
        // attributes, so it should cost one compare.
        while let Value::Attribute { value, .. } = self {
            self = *value;
        }
        self
    }

    /// A short description for error messages: the kind and a prefix of the content.
    pub fn describe(&self) -> String {
        fn clip(bytes: &[u8]) -> String {
            let s = String::from_utf8_lossy(&bytes[..bytes.len().min(32)]);
            let more = if bytes.len() > 32 { "..." } else { "" };
            format!("{s:?}{more}")
        }
        match self {
            Value::Nil => "nil".into(),
            Value::Int(i) => format!("integer {i}"),
            Value::BulkString(b) => format!("bulk string {}", clip(b)),
            Value::SimpleString(s) => format!("simple string {}", clip(s.as_bytes())),
            Value::Error { code, message } => format!("error {code} {}", clip(message.as_bytes())),
            Value::Array(a) => format!("array of {}", a.len()),
            Value::Map(m) => format!("map of {}", m.len()),
            Value::Set(s) => format!("set of {}", s.len()),
            Value::Double(d) => format!("double {d}"),
            Value::Boolean(b) => format!("boolean {b}"),
            Value::BigNumber(n) => format!("big number {}", clip(n.as_bytes())),
            Value::Verbatim { text, .. } => format!("verbatim string {}", clip(text)),
            Value::Push(p) => format!("push of {}", p.len()),
            Value::Attribute { value, .. } => value.describe(),
        }
    }

    /// Appends the RESP encoding of this value (RESP3 types in RESP3 form).
    ///
    /// Servers never need this (commands go out through [`crate::Cmd`]); it is
    /// here for test servers, fuzzing and round-trip tests.
    pub fn encode(&self, out: &mut Vec<u8>) {
        match self {
            Value::Nil => out.extend_from_slice(b"_\r\n"),
            Value::Int(i) => line(out, b':', itoa(*i).as_bytes()),
            Value::BulkString(b) => blob(out, b'$', b),
            Value::SimpleString(s) => line(out, b'+', s.as_bytes()),
            Value::Error { code, message } => {
                let mut text = Vec::with_capacity(code.len() + 1 + message.len());
                text.extend_from_slice(code.as_bytes());
                if !message.is_empty() {
                    text.push(b' ');
                    text.extend_from_slice(message.as_bytes());
                }
                if text.contains(&b'\r') || text.contains(&b'\n') {
                    blob(out, b'!', &text);
                } else {
                    line(out, b'-', &text);
                }
            }
            Value::Array(items) => aggregate(out, b'*', items),
            Value::Set(items) => aggregate(out, b'~', items),
            Value::Push(items) => aggregate(out, b'>', items),
            Value::Map(pairs) => pairs_out(out, b'%', pairs),
            Value::Double(d) => line(out, b',', format_double(*d).as_bytes()),
            Value::Boolean(b) => out.extend_from_slice(if *b { b"#t\r\n" } else { b"#f\r\n" }),
            Value::BigNumber(n) => line(out, b'(', n.as_bytes()),
            Value::Verbatim { format, text } => {
                let mut body = Vec::with_capacity(4 + text.len());
                body.extend_from_slice(format.as_bytes());
                body.push(b':');
                body.extend_from_slice(text);
                blob(out, b'=', &body);
            }
            Value::Attribute { attributes, value } => {
                pairs_out(out, b'|', attributes);
                value.encode(out);
            }
        }
    }
}

fn line(out: &mut Vec<u8>, kind: u8, body: &[u8]) {
    out.push(kind);
    out.extend_from_slice(body);
    out.extend_from_slice(b"\r\n");
}

fn blob(out: &mut Vec<u8>, kind: u8, body: &[u8]) {
    line(out, kind, itoa(body.len() as i64).as_bytes());
    out.extend_from_slice(body);
    out.extend_from_slice(b"\r\n");
}

fn aggregate(out: &mut Vec<u8>, kind: u8, items: &[Value]) {
    line(out, kind, itoa(items.len() as i64).as_bytes());
    for item in items {
        item.encode(out);
    }
}

fn pairs_out(out: &mut Vec<u8>, kind: u8, pairs: &[(Value, Value)]) {
    line(out, kind, itoa(pairs.len() as i64).as_bytes());
    for (k, v) in pairs {
        k.encode(out);
        v.encode(out);
    }
}

/// Formats a double the way Redis reads it back exactly (`inf`, `-inf`, `nan`,
/// shortest round-trip digits otherwise).
pub(crate) fn format_double(d: f64) -> String {
    if d.is_nan() {
        "nan".into()
    } else if d.is_infinite() {
        if d > 0.0 { "inf" } else { "-inf" }.into()
    } else {
        // `{:?}` is the shortest text that parses back to the same bits and
        // switches to exponent form for very large and small magnitudes.
        format!("{d:?}")
    }
}

/// Small, allocation-light integer formatting for the encoder.
pub(crate) fn itoa(n: i64) -> ItoaBuf {
    let mut buf = ItoaBuf {
        bytes: [0; 20],
        start: 20,
    };
    // Lengths and counts are mostly one or two digits.
    if (0..100).contains(&n) {
        let n = n as u8;
        if n >= 10 {
            buf.start = 18;
            buf.bytes[18] = b'0' + n / 10;
        } else {
            buf.start = 19;
        }
        buf.bytes[19] = b'0' + n % 10;
        return buf;
    }
    let negative = n < 0;
    let mut rest = n.unsigned_abs();
    loop {
        buf.start -= 1;
        buf.bytes[buf.start] = b'0' + (rest % 10) as u8;
        rest /= 10;
        if rest == 0 {
            break;
        }
    }
    if negative {
        buf.start -= 1;
        buf.bytes[buf.start] = b'-';
    }
    buf
}

/// The digits of a formatted integer, on the stack.
pub(crate) struct ItoaBuf {
    bytes: [u8; 20],
    start: usize,
}

impl ItoaBuf {
    pub(crate) fn as_bytes(&self) -> &[u8] {
        &self.bytes[self.start..]
    }
}

/// Decodes one reply from the front of `buf`.
///
/// Returns `Ok(Some((value, consumed)))` when a whole reply is there,
/// `Ok(None)` when more bytes are needed (never an error for a valid prefix),
/// and [`Error::Protocol`] for bytes that can never become a valid reply or
/// that break a limit. A top-level error reply (`-ERR ...`) decodes to
/// [`Value::Error`]; it is the engine that turns it into [`Error::Server`].
///
/// ```
/// use rb::resp::{decode, Value};
/// assert_eq!(decode(b"$3\r\nfoo\r\n+OK").unwrap(), Some((Value::BulkString(b"foo".to_vec()), 9)));
/// assert_eq!(decode(b"$3\r\nfo").unwrap(), None);
/// assert!(decode(b"$-5\r\n").is_err());
/// ```
///
/// # Errors
///
/// [`Error::Protocol`] (naming no host: the engine adds it) for bytes that
/// are not RESP, and for a bulk over [`MAX_BULK_LEN`], nesting over
/// [`MAX_DEPTH`], a line over [`MAX_LINE_LEN`] or an integer outside i64.
pub fn decode(buf: &[u8]) -> Result<Option<(Value, usize)>> {
    let (mut pos, mut budget) = (0, u64::MAX);
    Ok(build_at(buf, &mut pos, 0, &mut budget)?.map(|v| (v, pos)))
}

/// A streaming decoder: feed it the connection's read buffer after each read.
///
/// It remembers how far into the current reply it has checked, so the bytes
/// of a large reply are scanned once however many reads it takes.
#[derive(Debug)]
pub struct Decoder {
    scanner: Scanner,
    /// Aggregates already open around the replies this decoder reads: 1
    /// for the elements of a split array, so the nesting limit counts the
    /// array they came in.
    outer_depth: usize,
    /// Most elements one reply may hold, nested ones included.
    max_elements: u64,
}

impl Default for Decoder {
    fn default() -> Decoder {
        Decoder {
            scanner: Scanner::default(),
            outer_depth: 0,
            max_elements: u64::MAX,
        }
    }
}

impl Decoder {
    /// A decoder at the start of a reply.
    pub fn new() -> Decoder {
        Decoder::default()
    }

    /// A decoder for the elements of an array whose header was read
    /// elsewhere: the same limits, the array counted in the nesting.
    pub(crate) fn for_elements() -> Decoder {
        Decoder {
            outer_depth: 1,
            ..Decoder::default()
        }
    }

    /// Refuses replies of more than `max` elements, nested ones included,
    /// as soon as a header announces them (nothing is allocated for them).
    pub(crate) fn with_max_elements(mut self, max: usize) -> Decoder {
        self.max_elements = max as u64;
        self
    }

    /// The bytes the reply being decoded needs in all, as far as its headers
    /// tell so far (at least what was passed last time, plus one): a reader
    /// grows its buffer to this, not by doubling past it.
    pub(crate) fn need(&self) -> usize {
        self.scanner.need
    }

    /// Decodes the reply at the front of `buf`, which must begin where the
    /// previous complete reply ended and hold at least the bytes passed
    /// before (a read buffer that is only appended to between calls).
    ///
    /// # Errors
    ///
    /// As [`decode`]. After an error, [`Decoder::reset`] before reusing it.
    pub fn decode(&mut self, buf: &[u8]) -> Result<Option<(Value, usize)>> {
        let fresh = self.scanner.pos == 0;
        if fresh {
            // The usual case: the whole reply is there, build it in one pass.
            let mut pos = 0;
            let mut budget = self.max_elements;
            if let Some(v) = build_at(buf, &mut pos, self.outer_depth, &mut budget)? {
                return Ok(Some((v, pos)));
            }
        }
        // Incomplete: scan (without allocating) and remember how far, so the
        // next read resumes there instead of starting over.
        match self.scanner.scan(buf, self.outer_depth, self.max_elements) {
            Ok(Some(len)) => {
                self.scanner.reset();
                let mut pos = 0;
                let mut budget = self.max_elements;
                match build_at(&buf[..len], &mut pos, self.outer_depth, &mut budget)? {
                    Some(v) if pos == len => Ok(Some((v, len))),
                    _ => Err(Error::protocol("frame length mismatch")),
                }
            }
            Ok(None) => Ok(None),
            Err(e) => {
                self.scanner.reset();
                Err(e)
            }
        }
    }

    /// No reply is part-way decoded: the next call starts a new one.
    pub(crate) fn is_fresh(&self) -> bool {
        self.scanner.pos == 0
    }

    /// Forgets any partial progress (after the caller dropped its buffer).
    pub fn reset(&mut self) {
        self.scanner.reset();
    }
}

/// Walks a frame without allocating values, keeping its place between calls.
#[derive(Debug, Default)]
struct Scanner {
    /// Bytes of the frame already checked: everything before `pos` is whole.
    pos: usize,
    /// Elements still expected by each open aggregate, innermost last.
    open: Vec<u64>,
    /// Elements announced by the frame's headers so far.
    elements: u64,
    /// Bytes the frame needs in all, as far as its headers tell.
    need: usize,
}

/// What one header line says.
enum Head {
    /// A null (`_`, `$-1`, `*-1`) that ends at the given offset.
    Null(usize),
    /// A scalar that ends at the given offset.
    Done(usize),
    /// An aggregate expecting this many elements, its header ending at the offset.
    Open(u64, usize),
}

impl Scanner {
    /// Back to the start of a frame, keeping the stack's allocation.
    fn reset(&mut self) {
        self.pos = 0;
        self.open.clear();
        self.elements = 0;
        self.need = 0;
    }

    /// `Ok(Some(len))` once the frame at the front of `buf` is whole.
    /// `outer` aggregates are open around the frame (see [`Decoder`]); at
    /// most `max_elements` elements may be announced in it.
    fn scan(&mut self, buf: &[u8], outer: usize, max_elements: u64) -> Result<Option<usize>> {
        loop {
            let head = match scan_one(buf, self.pos)? {
                Some(head) => head,
                None => {
                    self.need = blob_need(buf, self.pos).max(buf.len() + 1);
                    return Ok(None);
                }
            };
            match head {
                Head::Open(count, end) if count > 0 => {
                    self.elements = self.elements.saturating_add(count);
                    if self.elements > max_elements {
                        return Err(too_many_elements(max_elements));
                    }
                    if outer + self.open.len() >= MAX_DEPTH {
                        return Err(Error::protocol(format!(
                            "aggregates nested deeper than {MAX_DEPTH}"
                        )));
                    }
                    self.open.push(count);
                    self.pos = end;
                }
                Head::Open(_, end) | Head::Done(end) | Head::Null(end) => {
                    self.pos = end;
                    // One element finished: close every aggregate it completes.
                    loop {
                        match self.open.last_mut() {
                            None => return Ok(Some(self.pos)),
                            Some(left) => {
                                *left -= 1;
                                if *left > 0 {
                                    break;
                                }
                                self.open.pop();
                            }
                        }
                    }
                }
            }
        }
    }
}

fn too_many_elements(max: u64) -> Error {
    Error::protocol(format!(
        "reply of more than {max} elements (the host's max_reply_elements)"
    ))
}

/// Where the bulk-like frame at `pos` ends, when its header is whole
/// (0 otherwise): what a reader must hold to finish it.
fn blob_need(buf: &[u8], pos: usize) -> usize {
    match (buf.get(pos), number_line(buf, pos + 1)) {
        (Some(b'$' | b'!' | b'='), Ok(Some((n, body)))) if n >= 0 => {
            body.saturating_add(n as usize).saturating_add(2)
        }
        _ => 0,
    }
}

/// Finds the CRLF-terminated line starting at `start`; returns its body's end.
fn find_line(buf: &[u8], start: usize, max: usize) -> Result<Option<usize>> {
    let rest = buf.get(start..).unwrap_or_default();
    let window = &rest[..rest.len().min(max.saturating_add(2))];
    match window.iter().position(|&b| b == b'\n') {
        Some(i) => {
            if i == 0 || window[i - 1] != b'\r' {
                return Err(Error::protocol("line ends in LF without CR"));
            }
            Ok(Some(start + i - 1))
        }
        None if window.len() > max.saturating_add(1) => {
            Err(Error::protocol(format!("line longer than {max} bytes")))
        }
        None => Ok(None),
    }
}

/// Longest numeric line: an i64 is at most 20 characters; allow some slack
/// for leading zeros and `+` signs, never for unbounded input.
const MAX_NUMBER_LEN: usize = 64;

/// Parses a decimal i64 with checked arithmetic.
fn parse_int(digits: &[u8]) -> Result<i64> {
    let (negative, body) = match digits.first() {
        Some(b'-') => (true, &digits[1..]),
        Some(b'+') => (false, &digits[1..]),
        _ => (false, digits),
    };
    if body.is_empty() {
        return Err(Error::protocol("empty integer"));
    }
    let mut n: i64 = 0;
    for &b in body {
        if !b.is_ascii_digit() {
            return Err(Error::protocol(format!(
                "invalid integer {:?}",
                String::from_utf8_lossy(digits)
            )));
        }
        let d = i64::from(b - b'0');
        n = n
            .checked_mul(10)
            .and_then(|n| {
                if negative {
                    n.checked_sub(d)
                } else {
                    n.checked_add(d)
                }
            })
            .ok_or_else(|| {
                Error::protocol(format!(
                    "integer {} does not fit i64",
                    String::from_utf8_lossy(digits)
                ))
            })?;
    }
    Ok(n)
}

/// Reads a numeric header at `start` (after the type byte).
fn number_line(buf: &[u8], start: usize) -> Result<Option<(i64, usize)>> {
    match find_line(buf, start, MAX_NUMBER_LEN)? {
        Some(end) => Ok(Some((parse_int(&buf[start..end])?, end + 2))),
        None => Ok(None),
    }
}

/// Length of a bulk-like frame, checked against the limits.
fn blob_len(n: i64, kind: u8) -> Result<usize> {
    if n < 0 || n as u64 > MAX_BULK_LEN as u64 {
        return Err(Error::protocol(format!(
            "{} length {n} out of range 0..={MAX_BULK_LEN}",
            kind as char
        )));
    }
    Ok(n as usize)
}

/// Scans one element's header (and a scalar's body) at `pos`.
fn scan_one(buf: &[u8], pos: usize) -> Result<Option<Head>> {
    let Some(&kind) = buf.get(pos) else {
        return Ok(None);
    };
    let start = pos + 1;
    let head = match kind {
        b'+' | b'-' | b'(' => match find_line(buf, start, MAX_LINE_LEN)? {
            Some(end) => {
                if kind == b'(' {
                    check_big_number(&buf[start..end])?;
                }
                Head::Done(end + 2)
            }
            None => return Ok(None),
        },
        b':' => match number_line(buf, start)? {
            Some((_, end)) => Head::Done(end),
            None => return Ok(None),
        },
        b',' => match find_line(buf, start, MAX_NUMBER_LEN)? {
            Some(end) => {
                parse_double(&buf[start..end])?;
                Head::Done(end + 2)
            }
            None => return Ok(None),
        },
        b'#' => match find_line(buf, start, MAX_NUMBER_LEN)? {
            Some(end) => {
                parse_bool(&buf[start..end])?;
                Head::Done(end + 2)
            }
            None => return Ok(None),
        },
        b'_' => match find_line(buf, start, MAX_NUMBER_LEN)? {
            Some(end) if end == start => Head::Null(end + 2),
            Some(_) => return Err(Error::protocol("null with a body")),
            None => return Ok(None),
        },
        b'$' | b'!' | b'=' => {
            let Some((n, body)) = number_line(buf, start)? else {
                return Ok(None);
            };
            if n == -1 && kind == b'$' {
                return Ok(Some(Head::Null(body)));
            }
            let len = blob_len(n, kind)?;
            if kind == b'=' && len < 4 {
                return Err(Error::protocol("verbatim string shorter than its format"));
            }
            // `len` <= 512 MiB and `body` <= buf.len(): no overflow on any target
            // with a 64-bit usize; checked anyway for 32-bit ones.
            let end = body
                .checked_add(len)
                .ok_or_else(|| Error::protocol("bulk length overflows"))?;
            if buf.len() < end + 2 {
                return Ok(None);
            }
            if &buf[end..end + 2] != b"\r\n" {
                return Err(Error::protocol("bulk string not followed by CRLF"));
            }
            if kind == b'='
                && (buf[body + 3] != b':' || !buf[body..body + 3].iter().all(u8::is_ascii_graphic))
            {
                return Err(Error::protocol(
                    "verbatim string without a three-letter format and ':'",
                ));
            }
            Head::Done(end + 2)
        }
        b'*' | b'~' | b'>' | b'%' | b'|' => {
            let Some((n, end)) = number_line(buf, start)? else {
                return Ok(None);
            };
            if n == -1 && kind == b'*' {
                return Ok(Some(Head::Null(end)));
            }
            if n < 0 {
                return Err(Error::protocol(format!(
                    "{} length {n} is negative",
                    kind as char
                )));
            }
            let n = n as u64;
            let count = match kind {
                b'%' => n * 2,
                // An attribute's pairs are followed by the value they describe.
                b'|' => n * 2 + 1,
                _ => n,
            };
            Head::Open(count, end)
        }
        other => {
            return Err(Error::protocol(format!(
                "unknown reply type byte 0x{other:02x}"
            )))
        }
    };
    Ok(Some(head))
}

fn parse_double(text: &[u8]) -> Result<f64> {
    std::str::from_utf8(text)
        .ok()
        .and_then(|s| s.parse::<f64>().ok())
        .ok_or_else(|| {
            Error::protocol(format!(
                "invalid double {:?}",
                String::from_utf8_lossy(text)
            ))
        })
}

fn parse_bool(text: &[u8]) -> Result<bool> {
    match text {
        b"t" => Ok(true),
        b"f" => Ok(false),
        _ => Err(Error::protocol(format!(
            "invalid boolean {:?}",
            String::from_utf8_lossy(text)
        ))),
    }
}

fn check_big_number(text: &[u8]) -> Result<()> {
    let digits = match text.first() {
        Some(b'-') | Some(b'+') => &text[1..],
        _ => text,
    };
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return Err(Error::protocol(format!(
            "invalid big number {:?}",
            String::from_utf8_lossy(&text[..text.len().min(32)])
        )));
    }
    Ok(())
}

/// Builds the value at `pos`, or `Ok(None)` if its bytes are not all there.
///
/// Validation is [`scan_one`]'s, shared with the scanner, so one-shot and
/// streaming decoding accept and refuse exactly the same bytes.
/// Allocations are bounded by the bytes present: an aggregate's capacity
/// by the bytes after its header, a bulk string's by its bytes, which are
/// only copied once all there.
/// `budget` is the elements the reply may still announce.
fn build_at(buf: &[u8], pos: &mut usize, depth: usize, budget: &mut u64) -> Result<Option<Value>> {
    if let Some((value, end)) = plain_bulk(buf, *pos) {
        *pos = end;
        return Ok(Some(value));
    }
    let Some(head) = scan_one(buf, *pos)? else {
        return Ok(None);
    };
    let kind = buf[*pos];
    match head {
        Head::Null(end) => {
            *pos = end;
            Ok(Some(Value::Nil))
        }
        Head::Done(end) => {
            let v = scalar(kind, &buf[*pos + 1..end - 2])?;
            *pos = end;
            Ok(Some(v))
        }
        Head::Open(count, end) => {
            if count > 0 && depth >= MAX_DEPTH {
                return Err(Error::protocol(format!(
                    "aggregates nested deeper than {MAX_DEPTH}"
                )));
            }
            *budget = budget.checked_sub(count).ok_or_else(|| {
                Error::protocol(format!(
                    "reply announces {count} elements, past the host's max_reply_elements"
                ))
            })?;
            let room = (buf.len() - end) / 3;
            *pos = end;
            let mut items: Vec<Value> =
                Vec::with_capacity(usize::try_from(count).unwrap_or(usize::MAX).min(room));
            for _ in 0..count {
                match build_at(buf, pos, depth + 1, budget)? {
                    Some(v) => items.push(v),
                    None => return Ok(None),
                }
            }
            Ok(Some(match kind {
                b'*' => Value::Array(items),
                b'~' => Value::Set(items),
                b'>' => Value::Push(items),
                _ => {
                    let value = if kind == b'|' { items.pop() } else { None };
                    let mut pairs = Vec::with_capacity(items.len() / 2);
                    let mut iter = items.into_iter();
                    while let (Some(k), Some(v)) = (iter.next(), iter.next()) {
                        pairs.push((k, v));
                    }
                    match value {
                        Some(value) => Value::Attribute {
                            attributes: pairs,
                            value: Box::new(value),
                        },
                        None => Value::Map(pairs),
                    }
                }
            }))
        }
    }
}

/// The common case of a whole, short-headed bulk string (`$<1-9 digits>\r\n`
/// then the bytes and CRLF), decoded in one tight pass. Anything else
/// (nulls, odd digits, incomplete input, errors) returns `None` and takes
/// the general path, which validates and reports it.
fn plain_bulk(buf: &[u8], pos: usize) -> Option<(Value, usize)> {
    match plain_bulk_or_nil(buf.get(pos..)?)? {
        (Some(bytes), used) => Some((Value::BulkString(bytes.to_vec()), pos + used)),
        // Nulls take the general path, which knows every spelling.
        (None, _) => None,
    }
}

/// The value of a whole scalar frame; `body` is what follows the type byte,
/// without the final CRLF.
fn scalar(kind: u8, body: &[u8]) -> Result<Value> {
    Ok(match kind {
        b'+' => Value::SimpleString(utf8(body.to_vec())),
        b'-' => error_value(body),
        b'(' => Value::BigNumber(utf8(body.to_vec())),
        b',' => Value::Double(parse_double(body)?),
        b'#' => Value::Boolean(parse_bool(body)?),
        b':' => Value::Int(parse_int(body)?),
        b'$' | b'!' | b'=' => {
            let Some(crlf) = body.iter().position(|&b| b == b'\r') else {
                return Err(Error::protocol("bulk header without CRLF"));
            };
            let bytes = body.get(crlf + 2..).unwrap_or_default();
            match kind {
                b'$' => Value::BulkString(bytes.to_vec()),
                b'!' => error_value(bytes),
                _ => Value::Verbatim {
                    format: utf8(bytes.get(..3).unwrap_or_default().to_vec()),
                    text: bytes.get(4..).unwrap_or_default().to_vec(),
                },
            }
        }
        other => {
            return Err(Error::protocol(format!(
                "unknown reply type byte 0x{other:02x}"
            )))
        }
    })
}

fn utf8(bytes: Vec<u8>) -> String {
    String::from_utf8(bytes).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
}

fn error_value(text: &[u8]) -> Value {
    let text = String::from_utf8_lossy(text);
    let (code, message) = crate::error::split_error_code(&text);
    Value::Error {
        code: code.to_owned(),
        message: message.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bulk(s: &str) -> Value {
        Value::BulkString(s.as_bytes().to_vec())
    }

    fn one(bytes: &[u8]) -> Value {
        let (v, n) = decode(bytes).unwrap().unwrap();
        assert_eq!(n, bytes.len());
        v
    }

    #[test]
    fn scalars() {
        assert_eq!(one(b"+OK\r\n"), Value::SimpleString("OK".into()));
        assert_eq!(one(b":-42\r\n"), Value::Int(-42));
        assert_eq!(one(b"$0\r\n\r\n"), bulk(""));
        assert_eq!(one(b"$-1\r\n"), Value::Nil);
        assert_eq!(one(b"*-1\r\n"), Value::Nil);
        assert_eq!(one(b"_\r\n"), Value::Nil);
        assert_eq!(one(b"#t\r\n"), Value::Boolean(true));
        assert_eq!(one(b",3.5\r\n"), Value::Double(3.5));
        assert_eq!(one(b",-inf\r\n"), Value::Double(f64::NEG_INFINITY));
        assert!(matches!(one(b",nan\r\n"), Value::Double(d) if d.is_nan()));
        assert_eq!(
            one(b"(123456789012345678901234567890\r\n"),
            Value::BigNumber("123456789012345678901234567890".into())
        );
        assert_eq!(
            one(b"=15\r\ntxt:Some string\r\n"),
            Value::Verbatim {
                format: "txt".into(),
                text: b"Some string".to_vec()
            }
        );
        assert_eq!(
            one(b"-WRONGTYPE Operation against a key\r\n"),
            Value::Error {
                code: "WRONGTYPE".into(),
                message: "Operation against a key".into()
            }
        );
        assert_eq!(
            one(b"!21\r\nSYNTAX invalid syntax\r\n"),
            Value::Error {
                code: "SYNTAX".into(),
                message: "invalid syntax".into()
            }
        );
    }

    #[test]
    fn aggregates() {
        assert_eq!(
            one(b"*3\r\n$3\r\nfoo\r\n$-1\r\n*0\r\n"),
            Value::Array(vec![bulk("foo"), Value::Nil, Value::Array(vec![])])
        );
        assert_eq!(
            one(b"%1\r\n+a\r\n:1\r\n"),
            Value::Map(vec![(Value::SimpleString("a".into()), Value::Int(1))])
        );
        assert_eq!(one(b"~1\r\n:1\r\n"), Value::Set(vec![Value::Int(1)]));
        assert_eq!(
            one(b">2\r\n+a\r\n+b\r\n").strip_attributes(),
            Value::Push(vec![
                Value::SimpleString("a".into()),
                Value::SimpleString("b".into())
            ])
        );
        let attr = one(b"|1\r\n+ttl\r\n:3\r\n*1\r\n:2\r\n");
        assert_eq!(
            attr,
            Value::Attribute {
                attributes: vec![(Value::SimpleString("ttl".into()), Value::Int(3))],
                value: Box::new(Value::Array(vec![Value::Int(2)])),
            }
        );
        assert_eq!(attr.strip_attributes(), Value::Array(vec![Value::Int(2)]));
    }

    #[test]
    fn consumes_one_reply_at_a_time() {
        let buf = b":1\r\n:2\r\n";
        assert_eq!(decode(buf).unwrap(), Some((Value::Int(1), 4)));
        assert_eq!(decode(&buf[4..]).unwrap(), Some((Value::Int(2), 4)));
    }

    #[test]
    fn every_strict_prefix_is_incomplete() {
        let samples: &[&[u8]] = &[
            b"+OK\r\n",
            b"-ERR no\r\n",
            b":12345\r\n",
            b"$5\r\nhello\r\n",
            b"$-1\r\n",
            b"*2\r\n$3\r\nfoo\r\n*1\r\n:1\r\n",
            b"%2\r\n+a\r\n,1.5\r\n+b\r\n#f\r\n",
            b"=8\r\ntxt:abcd\r\n",
            b"|1\r\n+k\r\n+v\r\n>1\r\n_\r\n",
            b"!3\r\nERR\r\n",
            b"(-12\r\n",
            b"~0\r\n",
        ];
        for s in samples {
            for cut in 0..s.len() {
                assert_eq!(
                    decode(&s[..cut]).unwrap(),
                    None,
                    "{:?} cut at {cut}",
                    String::from_utf8_lossy(s)
                );
            }
            assert!(decode(s).unwrap().is_some());
        }
    }

    #[test]
    fn streaming_decoder_resumes() {
        let mut value = Vec::new();
        Value::Array(
            (0..1000)
                .map(|i| Value::BulkString(format!("value-{i}").into_bytes()))
                .collect(),
        )
        .encode(&mut value);
        value.extend_from_slice(b":7\r\n");
        let mut d = Decoder::new();
        let mut got = None;
        for end in 0..=value.len() {
            if let Some(r) = d.decode(&value[..end]).unwrap() {
                got = Some((r, end));
                break;
            }
        }
        let ((v, n), end) = got.unwrap();
        assert_eq!(n, end);
        assert!(matches!(v, Value::Array(ref a) if a.len() == 1000));
        assert_eq!(d.decode(&value[n..]).unwrap(), Some((Value::Int(7), 4)));
    }

    /// `depth` arrays of one, each inside the last, around `:1`.
    pub(super) fn nested(depth: usize) -> Vec<u8> {
        let mut buf = b"*1\r\n".repeat(depth);
        buf.extend_from_slice(b":1\r\n");
        buf
    }

    #[test]
    fn depth_limit() {
        assert!(decode(&nested(MAX_DEPTH)).unwrap().is_some());
        let err = decode(&nested(MAX_DEPTH + 1)).unwrap_err();
        assert!(err.to_string().contains("nested deeper"), "{err}");
        // Empty aggregates do not open a level.
        let mut buf = b"*1\r\n".repeat(MAX_DEPTH);
        buf.extend_from_slice(b"*0\r\n");
        assert!(decode(&buf).unwrap().is_some());
    }

    #[test]
    fn bulk_limit() {
        assert_eq!(
            decode(format!("${MAX_BULK_LEN}\r\nabc").as_bytes()).unwrap(),
            None
        );
        let err = decode(format!("${}\r\n", MAX_BULK_LEN + 1).as_bytes()).unwrap_err();
        assert!(err.to_string().contains("out of range"), "{err}");
    }

    #[test]
    fn negative_lengths() {
        for bad in [
            &b"*-2\r\n"[..],
            b"$-5\r\n",
            b"%-1\r\n",
            b"~-1\r\n",
            b"=-1\r\n",
            b"!-1\r\n",
        ] {
            assert!(
                matches!(decode(bad), Err(Error::Protocol { .. })),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn huge_claimed_array_allocates_nothing() {
        // 2^31 elements promised, ten bytes delivered: the scanner only counts.
        let mut d = Decoder::new();
        let buf = b"*2147483648\r\n:1\r\n:2\r\n";
        assert_eq!(d.decode(buf).unwrap(), None);
        assert_eq!(d.scanner.open, vec![2147483648 - 2]);
        assert_eq!(
            decode(b"%9223372036854775807\r\n").unwrap(),
            None.or(decode(b"%9223372036854775807\r\n").unwrap())
        );
    }

    #[test]
    fn nulls_with_leading_zeros() {
        // Found by fuzzing: `$-00000001` is a null like `$-1`, in one-shot
        // decoding as in streaming.
        let frame = b"*3\r\n$-00000001\r\n*-01\r\n_\r\n";
        assert_eq!(
            one(frame),
            Value::Array(vec![Value::Nil, Value::Nil, Value::Nil])
        );
        assert_eq!(decode(&frame[..frame.len() - 1]).unwrap(), None);
    }

    #[test]
    fn integer_overflow() {
        assert_eq!(one(b":9223372036854775807\r\n"), Value::Int(i64::MAX));
        assert_eq!(one(b":-9223372036854775808\r\n"), Value::Int(i64::MIN));
        assert!(decode(b":9223372036854775808\r\n").is_err());
        assert!(decode(b":-9223372036854775809\r\n").is_err());
        assert!(decode(b"$99999999999999999999\r\n").is_err());
        assert!(decode(b"*99999999999999999999999\r\n").is_err());
    }

    #[test]
    fn garbage() {
        for bad in [
            &b"?\r\n"[..],
            b":abc\r\n",
            b":\r\n",
            b"#x\r\n",
            b",pi\r\n",
            b"_x\r\n",
            b"$3\r\nfooXY",
            b"+OK\n",
            b"=3\r\ntxt\r\n",
            b"=4\r\ntxtx\r\n",
            b"(12a\r\n",
        ] {
            assert!(
                matches!(decode(bad), Err(Error::Protocol { .. })),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn long_lines_are_refused_not_buffered_forever() {
        let mut line = vec![b'+'];
        line.extend(std::iter::repeat(b'a').take(MAX_LINE_LEN + 2));
        assert!(decode(&line).is_err());
        assert_eq!(decode(&line[..MAX_LINE_LEN]).unwrap(), None);
        let digits = [b':']
            .into_iter()
            .chain(std::iter::repeat(b'1').take(100))
            .collect::<Vec<_>>();
        assert!(decode(&digits).is_err());
    }

    #[test]
    fn encode_round_trips() {
        let v = Value::Array(vec![
            Value::Map(vec![(bulk("k"), Value::Double(1e300))]),
            Value::Set(vec![Value::Boolean(false), Value::BigNumber("-1".into())]),
            Value::Error {
                code: "ERR".into(),
                message: "multi\r\nline".into(),
            },
            Value::Verbatim {
                format: "mkd".into(),
                text: b"# hi".to_vec(),
            },
            Value::Double(-0.1),
            Value::Int(i64::MIN),
        ]);
        let mut buf = Vec::new();
        v.encode(&mut buf);
        assert_eq!(one(&buf), v);
    }

    #[test]
    fn itoa_matches_std() {
        for n in [0, 1, -1, 9, 10, 99, 100, i64::MAX, i64::MIN, 123456789] {
            assert_eq!(itoa(n).as_bytes(), n.to_string().as_bytes());
        }
    }
}
