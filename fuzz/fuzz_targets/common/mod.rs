//! Checks shared by the fuzz targets and by `src/fuzz_replay.rs`, a unit
//! test of the crate which replays `fuzz/regressions/` under `cargo test`
//! through this very module. Depends on nothing but `rb` (with its
//! `fuzzing` feature, for the engine's reply stream).
#![allow(dead_code)]

use rb::fuzzing::{Frame, ReplyStream};
use rb::resp::{decode, Decoder};
use rb::Value;

/// `Value` equality that takes any NaN as equal to any NaN (`Value`'s own
/// `PartialEq` says a NaN double is not equal to itself).
pub fn same(a: &Value, b: &Value) -> bool {
    fn all(x: &[Value], y: &[Value]) -> bool {
        x.len() == y.len() && x.iter().zip(y).all(|(a, b)| same(a, b))
    }
    fn pairs(x: &[(Value, Value)], y: &[(Value, Value)]) -> bool {
        x.len() == y.len()
            && x.iter()
                .zip(y)
                .all(|((ak, av), (bk, bv))| same(ak, bk) && same(av, bv))
    }
    match (a, b) {
        (Value::Double(x), Value::Double(y)) => x == y || (x.is_nan() && y.is_nan()),
        (Value::Array(x), Value::Array(y))
        | (Value::Set(x), Value::Set(y))
        | (Value::Push(x), Value::Push(y)) => all(x, y),
        (Value::Map(x), Value::Map(y)) => pairs(x, y),
        (
            Value::Attribute {
                attributes: ax,
                value: av,
            },
            Value::Attribute {
                attributes: bx,
                value: bv,
            },
        ) => pairs(ax, bx) && same(av, bv),
        _ => a == b,
    }
}

/// `same` over two sequences of values.
pub fn same_all(a: &[Value], b: &[Value]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(a, b)| same(a, b))
}

/// Encodes `v` and decodes it back: it must come back whole and unchanged.
pub fn check_encode_decode(v: &Value) {
    let mut buf = Vec::new();
    v.encode(&mut buf);
    match decode(&buf) {
        Ok(Some((back, n))) => {
            assert_eq!(n, buf.len(), "re-encoding of {v:?} not consumed whole");
            assert!(same(&back, v), "{v:?} re-encoded and decoded as {back:?}");
        }
        other => panic!(
            "re-encoding of {v:?} ({:?}) decodes as {other:?}",
            String::from_utf8_lossy(&buf)
        ),
    }
}

/// One-shot decode of arbitrary bytes: never a panic, never more consumed
/// than given, and whatever decodes re-encodes to an equal value.
pub fn check_oneshot(data: &[u8]) {
    if let Ok(Some((v, n))) = decode(data) {
        assert!(n > 0 && n <= data.len(), "consumed {n} of {}", data.len());
        check_encode_decode(&v);
    }
}

/// How decoding a buffer reply after reply ended.
#[derive(Debug, PartialEq, Eq)]
pub enum End {
    /// Out of bytes, with this many left over (a partial reply).
    Incomplete(usize),
    /// A protocol error.
    Error,
}

/// Replies of `data` by repeated one-shot `decode`, each after the last.
pub fn oneshot_all(data: &[u8]) -> (Vec<Value>, End) {
    let mut values = Vec::new();
    let mut at = 0;
    loop {
        match decode(&data[at..]) {
            Ok(Some((v, n))) => {
                assert!(
                    n > 0 && n <= data.len() - at,
                    "consumed {n} of {}",
                    data.len() - at
                );
                values.push(v);
                at += n;
            }
            Ok(None) => return (values, End::Incomplete(data.len() - at)),
            Err(_) => return (values, End::Error),
        }
    }
}

/// Feeds `data` through a read buffer that grows by `sizes` (cycled;
/// `usize::MAX` = all the rest), as a connection's read loop does: after
/// each read `take` consumes what it can from the front of the buffer
/// (`Err` = a protocol error, which ends the feed).
fn feed(data: &[u8], sizes: &[usize], mut take: impl FnMut(&mut Vec<u8>) -> Result<(), ()>) -> End {
    assert!(sizes.iter().all(|&s| s > 0), "chunk sizes must be positive");
    let mut sizes = sizes.iter().cycle();
    let mut pending = data;
    let mut buf = Vec::new();
    loop {
        if take(&mut buf).is_err() {
            return End::Error;
        }
        if pending.is_empty() {
            return End::Incomplete(buf.len());
        }
        let n = (*sizes.next().unwrap()).min(pending.len());
        buf.extend_from_slice(&pending[..n]);
        pending = &pending[n..];
    }
}

/// Replies of `data` through one `Decoder` fed in chunks of `sizes` (see
/// [`feed`]), each reply dropped from the buffer as soon as it is decoded.
pub fn stream_all(data: &[u8], sizes: &[usize]) -> (Vec<Value>, End) {
    let mut decoder = Decoder::new();
    let mut values = Vec::new();
    let end = feed(data, sizes, |buf| loop {
        // Take every reply already whole before reading more.
        match decoder.decode(buf) {
            Ok(Some((v, n))) => {
                assert!(n > 0 && n <= buf.len(), "consumed {n} of {}", buf.len());
                values.push(v);
                buf.drain(..n);
            }
            Ok(None) => return Ok(()),
            Err(_) => return Err(()),
        }
    });
    (values, end)
}

/// Streaming in chunks of `sizes` yields the same replies, and ends the same
/// way, as one-shot decoding of the whole buffer.
pub fn check_stream(data: &[u8], sizes: &[usize]) {
    let (whole, whole_end) = oneshot_all(data);
    let (streamed, streamed_end) = stream_all(data, sizes);
    assert!(
        same_all(&whole, &streamed),
        "chunks {sizes:?}: one-shot gave {whole:?}, streaming gave {streamed:?}"
    );
    assert_eq!(whole_end, streamed_end, "chunks {sizes:?}: ends differ");
}

/// Replies of `data` through one `ReplyStream` fed chunks of `sizes` (as
/// [`stream_all`]), asking before each reply to split it as an array of
/// `announce(reply number)` elements; split arrays are put back together.
pub fn split_all(
    data: &[u8],
    sizes: &[usize],
    announce: impl Fn(usize) -> Option<usize>,
) -> (Vec<Value>, End) {
    let mut stream = ReplyStream::new();
    let mut values = Vec::new();
    // The split array being put back together: elements still due, and so far.
    let mut open: Option<(usize, Vec<Value>)> = None;
    let end = feed(data, sizes, |buf| loop {
        let split = announce(values.len());
        let (frame, n) = match stream.next(buf, split) {
            Ok(Some(next)) => next,
            Ok(None) => return Ok(()),
            Err(_) => return Err(()),
        };
        assert!(n > 0 && n <= buf.len(), "consumed {n} of {}", buf.len());
        let element = match frame {
            Frame::Reply(v) => {
                assert!(open.is_none(), "a whole reply inside a split array");
                values.push(v);
                None
            }
            Frame::Split { count } => {
                assert!(open.is_none(), "a split inside a split array");
                assert_eq!(Some(count), split, "split without being asked");
                open = Some((count, Vec::new()));
                None
            }
            Frame::Bulk { bytes, last } => Some((
                bytes.map_or(Value::Nil, |b| Value::BulkString(b.to_vec())),
                last,
            )),
            Frame::Element { value, last } => Some((value, last)),
        };
        buf.drain(..n);
        if let Some((value, last)) = element {
            let Some((due, items)) = open.as_mut() else {
                panic!("an element outside a split array");
            };
            items.push(value);
            assert_eq!(last, items.len() == *due, "`last` on the wrong element");
            if last {
                let (_, items) = open.take().unwrap();
                values.push(Value::Array(items));
            }
        }
    });
    (values, end)
}

/// Splitting announced arrays, in chunks of `sizes`, yields the same
/// replies as one-shot decoding, and fails where it fails. Announcements
/// are right for every other array, off by one for the rest, and arbitrary
/// for other replies.
pub fn check_split(data: &[u8], sizes: &[usize]) {
    let (whole, whole_end) = oneshot_all(data);
    let announce = |i: usize| match whole.get(i) {
        Some(Value::Array(items)) => Some(items.len() + i % 2),
        _ => Some(i % 3),
    };
    let (split, split_end) = split_all(data, sizes, announce);
    assert!(
        same_all(&whole, &split),
        "chunks {sizes:?}: one-shot gave {whole:?}, split gave {split:?}"
    );
    // A split array's elements leave the buffer as they come, so only the
    // kind of ending is compared, not the bytes left over.
    assert_eq!(
        matches!(whole_end, End::Error),
        matches!(split_end, End::Error),
        "chunks {sizes:?}: one-shot ended {whole_end:?}, split {split_end:?}"
    );
}

/// Chunk sizes a nibble of a `decode_stream` input picks.
const CHUNK_SIZES: [usize; 16] = [
    1,
    2,
    3,
    4,
    5,
    7,
    8,
    13,
    16,
    31,
    64,
    100,
    257,
    1000,
    4096,
    usize::MAX,
];

/// Splits a `decode_stream` input: its first two bytes are four nibbles, each
/// picking a chunk size from [`CHUNK_SIZES`] (cycled); the rest is the RESP.
pub fn split_stream_input(data: &[u8]) -> (Vec<usize>, &[u8]) {
    let (head, body) = data.split_at(data.len().min(2));
    let mut sizes: Vec<usize> = head
        .iter()
        .flat_map(|&b| [b >> 4, b & 0x0f])
        .map(|n| CHUNK_SIZES[usize::from(n)])
        .collect();
    if sizes.is_empty() {
        sizes.push(1);
    }
    (sizes, body)
}
