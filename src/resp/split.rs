//! [`ReplyStream`]: a reply decoder that can hand an array over element by
//! element, as its bytes arrive.
//!
//! The engine merges runs of `GET` into one `MGET` per host; the reply is an
//! array whose elements go to different promises. Building that array first
//! costs an allocation and a copy per element, and a read that ends inside
//! the array would build (and drop) its first half each time. Split, each
//! element is handed over as soon as it is complete, and a plain bulk
//! string is handed over as the bytes in the read buffer, so the caller
//! converts it straight to its final type.
//!
//! Only arrays whose header is plain (`*<n>\r\n`, digits only) and whose
//! length the caller announced are split; every other reply, and every
//! element that is not a plain bulk string or nil, goes through [`Decoder`],
//! so the stream accepts and refuses exactly what the decoder does.

use super::{Decoder, Value, MAX_BULK_LEN};
use crate::error::Result;

/// One step of a [`ReplyStream`].
#[derive(Debug, PartialEq)]
pub enum Frame<'a> {
    /// A whole reply.
    Reply(Value),
    /// The header of an announced array of `count` elements: the elements
    /// follow as [`Frame::Element`] or [`Frame::Bulk`].
    Split {
        /// Elements to come.
        count: usize,
    },
    /// An element of a split array, decoded; `last` marks its final one.
    Element {
        /// The element.
        value: Value,
        /// This is the array's final element.
        last: bool,
    },
    /// A plain bulk string element (`None`: nil) of a split array, as the
    /// bytes in the caller's buffer; `last` marks the array's final element.
    Bulk {
        /// The string's bytes, or `None` for nil.
        bytes: Option<&'a [u8]>,
        /// This is the array's final element.
        last: bool,
    },
}

/// A [`Decoder`] for a stream of replies in which the caller may announce
/// that the next reply is an array of a known length, to have it split.
///
/// (Crate-private, public only as `rb::fuzzing::ReplyStream`; the test
/// `a_split_then_a_reply` walks an example.)
#[derive(Debug)]
pub struct ReplyStream {
    /// Whole replies.
    decoder: Decoder,
    /// Elements of the array being split (the array counts for nesting).
    elements: Decoder,
    /// Elements still to come of the array being split.
    split_left: usize,
    /// Most elements of one reply (see [`Decoder::with_max_elements`]).
    max_elements: usize,
}

impl Default for ReplyStream {
    fn default() -> ReplyStream {
        ReplyStream::new()
    }
}

impl ReplyStream {
    /// A stream at the start of a reply.
    pub fn new() -> ReplyStream {
        ReplyStream {
            decoder: Decoder::new(),
            elements: Decoder::for_elements(),
            split_left: 0,
            max_elements: usize::MAX,
        }
    }

    /// A stream refusing replies of more than `max` elements, nested ones
    /// included, as soon as a header announces them.
    pub(crate) fn with_max_elements(max: usize) -> ReplyStream {
        ReplyStream {
            decoder: Decoder::new().with_max_elements(max),
            elements: Decoder::for_elements().with_max_elements(max),
            split_left: 0,
            max_elements: max,
        }
    }

    /// The bytes the frame being decoded needs in all, from its first byte,
    /// as far as its headers tell (see [`Decoder::need`]).
    pub(crate) fn need(&self) -> usize {
        if self.split_left > 0 {
            self.elements.need()
        } else {
            self.decoder.need()
        }
    }

    /// Forgets a reply part-way decoded (its bytes were taken elsewhere).
    pub(crate) fn reset(&mut self) {
        self.decoder.reset();
    }

    /// Inside a split array: its elements are handed over one by one.
    pub(crate) fn is_splitting(&self) -> bool {
        self.split_left > 0
    }

    /// Whether the stream is inside a reply (a split array, or a reply
    /// part-way decoded): then the connection cannot be reused as is.
    pub fn is_mid_reply(&self) -> bool {
        self.split_left > 0 || !self.decoder.is_fresh() || !self.elements.is_fresh()
    }

    /// The next frame at the front of `buf` and the bytes it takes, or
    /// `Ok(None)` when more bytes are needed. `buf` follows the rules of
    /// [`Decoder::decode`] (it starts where the last frame ended, and holds
    /// at least the bytes passed before).
    ///
    /// `split`, read only at the start of a reply: `Some(n)` when the next
    /// reply, if it is an array of exactly `n` (more than 0) elements,
    /// should come as [`Frame::Split`] and then its elements.
    #[inline]
    pub fn next<'a>(
        &mut self,
        buf: &'a [u8],
        split: Option<usize>,
    ) -> Result<Option<(Frame<'a>, usize)>> {
        if self.split_left > 0 {
            return self.next_element(buf);
        }
        if let (Some(n), true) = (split, self.decoder.is_fresh()) {
            match array_head(buf) {
                ArrayHead::Incomplete => return Ok(None),
                ArrayHead::Count(count, used) if count == n && n > 0 && n <= self.max_elements => {
                    self.split_left = n;
                    return Ok(Some((Frame::Split { count: n }, used)));
                }
                // Another shape (an error reply, say): decoded whole.
                _ => {}
            }
        }
        Ok(self
            .decoder
            .decode(buf)?
            .map(|(value, used)| (Frame::Reply(value), used)))
    }

    #[inline]
    fn next_element<'a>(&mut self, buf: &'a [u8]) -> Result<Option<(Frame<'a>, usize)>> {
        if self.elements.is_fresh() {
            // The usual element, read in place: no value is built.
            if let Some((bytes, used)) = plain_bulk_or_nil(buf) {
                self.split_left -= 1;
                let last = self.split_left == 0;
                return Ok(Some((Frame::Bulk { bytes, last }, used)));
            }
        }
        let Some((value, used)) = self.elements.decode(buf)? else {
            return Ok(None);
        };
        self.split_left -= 1;
        let last = self.split_left == 0;
        Ok(Some((Frame::Element { value, last }, used)))
    }
}

/// The header of an array reply, read without the decoder.
#[derive(Debug, PartialEq, Eq)]
enum ArrayHead {
    /// Not all of the header is here yet.
    Incomplete,
    /// `*<count>\r\n`, taking `.1` bytes.
    Count(usize, usize),
    /// Anything else, left to the decoder to judge.
    Other,
}

/// Reads `*<count>\r\n` in its plain form only (digits, no sign, no
/// leading zero, at most 9 digits); every other shape is
/// [`ArrayHead::Other`] and goes to the decoder, which validates it.
fn array_head(buf: &[u8]) -> ArrayHead {
    if buf.first() != Some(&b'*') {
        return if buf.is_empty() {
            ArrayHead::Incomplete
        } else {
            ArrayHead::Other
        };
    }
    let mut count = 0usize;
    for (i, &b) in buf.iter().enumerate().skip(1) {
        match b {
            b'0'..=b'9' if i <= 9 && !(i == 2 && buf[1] == b'0') => {
                count = count * 10 + usize::from(b - b'0');
            }
            b'\r' if i > 1 => {
                return match buf.get(i + 1) {
                    None => ArrayHead::Incomplete,
                    Some(b'\n') => ArrayHead::Count(count, i + 2),
                    Some(_) => ArrayHead::Other,
                };
            }
            _ => return ArrayHead::Other,
        }
    }
    ArrayHead::Incomplete
}

/// The plain bulk string (its bytes, in place) or the plain nil (`$-1\r\n`,
/// or RESP3's `_\r\n`; `None`) at the front of `buf`, with the bytes it takes; `None` for
/// anything else, complete or not, which the general path decodes and
/// validates. Accepts only what the general path decodes the same way.
#[inline]
pub(crate) fn plain_bulk_or_nil(buf: &[u8]) -> Option<(Option<&[u8]>, usize)> {
    if buf.first() != Some(&b'$') {
        return buf.starts_with(b"_\r\n").then_some((None, 3));
    }
    if buf.starts_with(b"$-1\r\n") {
        return Some((None, 5));
    }
    let (len, start) = plain_bulk_header(buf)?;
    let end = start + len;
    if buf.get(end..end + 2)? != b"\r\n" {
        return None;
    }
    Some((Some(&buf[start..end]), end + 2))
}

/// The header of a plain bulk string at the front of `buf` (`$<len>\r\n`,
/// `len` at most [`MAX_BULK_LEN`]): its length and the header's; `None`
/// for anything else, complete or not (which the general path decodes and
/// validates).
#[inline]
pub(crate) fn plain_bulk_header(buf: &[u8]) -> Option<(usize, usize)> {
    if buf.first() != Some(&b'$') {
        return None;
    }
    let mut len = 0usize;
    let mut i = 1;
    loop {
        let b = *buf.get(i)?;
        if b == b'\r' {
            break;
        }
        // At most 9 digits: no overflow, and 512 MiB is checked below.
        if !b.is_ascii_digit() || i > 9 {
            return None;
        }
        len = len * 10 + usize::from(b - b'0');
        i += 1;
    }
    if i == 1 || len > MAX_BULK_LEN || buf.get(i + 1) != Some(&b'\n') {
        return None;
    }
    Some((len, i + 2))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_split_then_a_reply() {
        let mut stream = ReplyStream::new();
        let buf = b"*2\r\n$1\r\na\r\n$-1\r\n+OK\r\n";
        let (frame, used) = stream.next(buf, Some(2)).unwrap().unwrap();
        assert_eq!((frame, used), (Frame::Split { count: 2 }, 4));
        let (frame, used) = stream.next(&buf[4..], None).unwrap().unwrap();
        assert_eq!(
            (frame, used),
            (
                Frame::Bulk {
                    bytes: Some(&b"a"[..]),
                    last: false
                },
                7
            )
        );
        let (frame, used) = stream.next(&buf[11..], None).unwrap().unwrap();
        assert_eq!(
            (frame, used),
            (
                Frame::Bulk {
                    bytes: None,
                    last: true
                },
                5
            )
        );
        let (frame, _) = stream.next(&buf[16..], None).unwrap().unwrap();
        assert_eq!(frame, Frame::Reply(Value::SimpleString("OK".into())));
    }
    use crate::resp::decode;

    /// Splitting an array does not lift the nesting limit: its elements
    /// are decoded one level down.
    #[test]
    fn nesting_limit_counts_the_split_array() {
        use crate::resp::{tests::nested, MAX_DEPTH};
        for depth in [MAX_DEPTH, MAX_DEPTH + 1] {
            let buf = nested(depth);
            let whole = decode(&buf).map(|v| v.is_some());
            let mut stream = ReplyStream::new();
            let (frame, used) = stream.next(&buf, Some(1)).unwrap().unwrap();
            assert_eq!(frame, Frame::Split { count: 1 });
            let split = stream.next(&buf[used..], None).map(|v| v.is_some());
            assert_eq!(
                format!("{split:?}"),
                format!("{whole:?}"),
                "nested {depth} deep"
            );
        }
    }

    #[test]
    fn array_heads_in_plain_form_only() {
        assert_eq!(array_head(b"*256\r\n$1\r\na"), ArrayHead::Count(256, 6));
        assert_eq!(array_head(b"*2\r\n"), ArrayHead::Count(2, 4));
        assert_eq!(array_head(b"*0\r\n"), ArrayHead::Count(0, 4));
        assert_eq!(
            array_head(b"*999999999\r\n"),
            ArrayHead::Count(999_999_999, 12)
        );
        for partial in [&b""[..], b"*", b"*2", b"*25", b"*256\r"] {
            assert_eq!(array_head(partial), ArrayHead::Incomplete, "{partial:?}");
        }
        // Everything else is the decoder's to judge.
        for other in [
            &b"-ERR no\r\n"[..],
            b"$3\r\nfoo\r\n",
            b"*-1\r\n",
            b"*+2\r\n",
            b"*02\r\n",
            b"*\r\n",
            b"*2x\r\n",
            b"*2\rx",
            b"*1000000000\r\n",
            b"|1\r\n+a\r\n+b\r\n*2\r\n",
        ] {
            assert_eq!(array_head(other), ArrayHead::Other, "{other:?}");
        }
    }

    /// `plain_bulk_or_nil` is only a shortcut: on every input, and on
    /// every prefix of it, where it answers, `decode` answers the same.
    #[test]
    fn plain_bulk_or_nil_agrees_with_decode_on_every_prefix() {
        let inputs: [&[u8]; 15] = [
            b"$3\r\nfoo\r\n",
            b"$0\r\n\r\n",
            b"$-1\r\n",
            b"$-1\r",
            b"$-01\r\n",
            b"$-2\r\n",
            b"$3\r\nfoo\r\r",
            b"$03\r\nfoo\r\n",
            b"$+3\r\nfoo\r\n",
            b"$10000000000\r\n",
            b"$3\r\nf\r\n\r\n",
            b"_\r\n",
            b"*2\r\n$1\r\na\r\n:1\r\n",
            b"-ERR x\r\n",
            b"|1\r\n+a\r\n+b\r\n$1\r\nz\r\n",
        ];
        let mut answered = 0;
        for input in inputs {
            for end in 0..=input.len() {
                let buf = &input[..end];
                let Some((bytes, used)) = plain_bulk_or_nil(buf) else {
                    continue;
                };
                answered += 1;
                let expected = Value::from_bulk_bytes(bytes);
                assert_eq!(
                    decode(buf).unwrap(),
                    Some((expected, used)),
                    "{:?}",
                    String::from_utf8_lossy(buf)
                );
            }
        }
        assert_eq!(answered, 6, "the plain spellings, complete");
    }
}
