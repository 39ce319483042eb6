//! Values built from the fuzz bytes round-trip through `Value::encode` and
//! `decode`, and commands built from them encode to exactly `encoded_len()`
//! bytes that decode to an array of their name and arguments.
#![no_main]

use arbitrary::{Result, Unstructured};
use libfuzzer_sys::fuzz_target;
use rb::resp::decode;
use rb::Value;

mod common;

/// Aggregates nest at most this deep (the decoder allows 128; a few levels
/// cover every code path without making inputs slow).
const MAX_NESTING: usize = 6;
/// Longest aggregate built.
const MAX_ITEMS: usize = 8;
/// Longest string or byte string built.
const MAX_BYTES: usize = 512;

fn bytes(u: &mut Unstructured) -> Result<Vec<u8>> {
    let len = u.arbitrary_len::<u8>()?.min(MAX_BYTES);
    Ok(u.bytes(len)?.to_vec())
}

/// Any text, CR and LF removed: simple strings must not hold them.
fn line_text(u: &mut Unstructured) -> Result<String> {
    let s: String = u.arbitrary()?;
    Ok(s.chars()
        .filter(|c| *c != '\r' && *c != '\n')
        .take(MAX_BYTES)
        .collect())
}

/// `n` characters drawn from `alphabet`.
fn word(u: &mut Unstructured, alphabet: &[u8], n: usize) -> Result<String> {
    let mut s = String::with_capacity(n);
    for _ in 0..n {
        s.push(char::from(*u.choose(alphabet)?));
    }
    Ok(s)
}

const UPPER: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ";
const LOWER: &[u8] = b"abcdefghijklmnopqrstuvwxyz";
const DIGITS: &[u8] = b"0123456789";

/// A decimal integer of up to 41 digits: `0` or `-?[1-9][0-9]{0,40}`.
fn big_number(u: &mut Unstructured) -> Result<String> {
    if u.ratio(1, 8)? {
        return Ok("0".into());
    }
    let mut s = String::new();
    if u.arbitrary()? {
        s.push('-');
    }
    s.push_str(&word(u, &DIGITS[1..], 1)?);
    let rest = u.int_in_range(0..=40)?;
    s.push_str(&word(u, DIGITS, rest)?);
    Ok(s)
}

fn items(u: &mut Unstructured, depth: usize) -> Result<Vec<Value>> {
    let n = u.int_in_range(0..=MAX_ITEMS)?;
    (0..n).map(|_| value(u, depth + 1)).collect()
}

fn pairs(u: &mut Unstructured, depth: usize) -> Result<Vec<(Value, Value)>> {
    let n = u.int_in_range(0..=MAX_ITEMS / 2)?;
    (0..n)
        .map(|_| Ok((value(u, depth + 1)?, value(u, depth + 1)?)))
        .collect()
}

/// A `Value` of any variant in the forms that round-trip: error codes are
/// upper-case words, verbatim formats three lower-case letters, and so on.
/// Doubles may be NaN (compared NaN-tolerantly).
fn value(u: &mut Unstructured, depth: usize) -> Result<Value> {
    let kinds = if depth >= MAX_NESTING { 9 } else { 14 };
    Ok(match u.choose_index(kinds)? {
        0 => Value::Nil,
        1 => Value::Int(u.arbitrary()?),
        2 => Value::BulkString(bytes(u)?),
        3 => Value::SimpleString(line_text(u)?),
        4 => {
            let n = u.int_in_range(1..=10)?;
            Value::Error {
                code: word(u, UPPER, n)?,
                // CR or LF in the message makes it a blob error (`!`).
                message: u.arbitrary()?,
            }
        }
        5 => Value::Double(u.arbitrary()?),
        6 => Value::Boolean(u.arbitrary()?),
        7 => Value::BigNumber(big_number(u)?),
        8 => Value::Verbatim {
            format: word(u, LOWER, 3)?,
            text: bytes(u)?,
        },
        9 => Value::Array(items(u, depth)?),
        10 => Value::Set(items(u, depth)?),
        11 => Value::Push(items(u, depth)?),
        12 => Value::Map(pairs(u, depth)?),
        _ => Value::Attribute {
            attributes: pairs(u, depth)?,
            value: Box::new(value(u, depth + 1)?),
        },
    })
}

fn check_cmd(name: &str, args: &[Vec<u8>]) {
    let c = rb::cmd(name).args_from(args);
    let packed = c.to_packed();
    assert_eq!(packed.len(), c.encoded_len(), "{c:?}");
    let mut expected = vec![Value::BulkString(name.as_bytes().to_vec())];
    expected.extend(args.iter().map(|a| Value::BulkString(a.clone())));
    assert_eq!(
        decode(&packed).unwrap(),
        Some((Value::Array(expected), packed.len())),
        "{c:?}"
    );
}

fuzz_target!(|data: &[u8]| {
    let mut u = Unstructured::new(data);
    if let Ok(v) = value(&mut u, 0) {
        common::check_encode_decode(&v);
    }
    // Whatever bytes are left make a command.
    let name: String = u.arbitrary().unwrap_or_default();
    let args: Vec<Vec<u8>> = u.arbitrary().unwrap_or_default();
    check_cmd(&name, &args);
});
