//! [`FromValue`]: typed replies.
//!
//! Conversions accept what Redis sends for a type in both RESP2 and RESP3
//! (a score is a bulk string in RESP2 and a double in RESP3; a hash is a flat
//! array in RESP2 and a map in RESP3), so code written against one protocol
//! works on the other. A mismatch is an [`Error::Type`], never a panic; an
//! error reply is an [`Error::Server`].

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::hash::{BuildHasher, Hash};

use crate::error::{Error, Result};
use crate::resp::Value;

/// A Rust type a reply can be converted to.
///
/// Replies are plain data, and the async client converts them on its
/// driver thread, so the types are `Send`.
pub trait FromValue: Sized + Send {
    /// Converts the reply.
    ///
    /// # Errors
    ///
    /// [`Error::Type`] when the reply does not fit `Self` (its kind, its
    /// length, or a number out of range), describing the reply. An error
    /// nested in an aggregate is an [`Error::Server`] where a plain value
    /// was expected.
    fn from_value(value: Value) -> Result<Self>;

    /// For `Vec<u8>`: lets `Vec<T>` take a bulk string whole when `T` is `u8`.
    #[doc(hidden)]
    fn from_byte_vec(_bytes: Vec<u8>) -> Option<Vec<Self>> {
        None
    }

    /// Converts without taking the value, for types that need none of it
    /// (`()`); `None` means "take a clone instead".
    #[doc(hidden)]
    fn from_shared(_value: &Value) -> Option<Result<Self>> {
        None
    }

    /// Converts a plain bulk string (`None` for nil) straight off the wire,
    /// without building a [`Value`] first: the engine's path for the values
    /// of merged `MGET`s. `None` means "build the value instead".
    #[doc(hidden)]
    fn from_bulk(_bytes: Option<&[u8]>) -> Option<Result<Self>> {
        None
    }

    /// Whether [`FromValue::from_bulk`] of any bulk string is `Some(Ok(_))`
    /// (the bytes' types): such a conversion cannot fail, so the async
    /// client may leave it to the thread that takes the reply, where the
    /// allocation it makes is freed (an allocation made on the driver
    /// thread and freed on another takes the allocator's slow paths).
    #[doc(hidden)]
    fn bulk_always_converts() -> bool {
        false
    }

    /// For tuples: their arity, so `Vec<(A, B)>` can read a flat RESP2 array
    /// (`ZRANGE ... WITHSCORES`) as well as a RESP3 array of pairs.
    #[doc(hidden)]
    fn tuple_arity() -> Option<usize> {
        None
    }
}

fn mismatch<T>(expected: &'static str, value: &Value) -> Result<T> {
    if let Value::Error { code, message } = value {
        return Err(Error::Server {
            host: None,
            command: "".into(),
            code: code.as_str().into(),
            message: message.as_str().into(),
        });
    }
    Err(Error::type_mismatch(expected, value.describe()))
}

impl FromValue for Value {
    fn from_value(value: Value) -> Result<Self> {
        Ok(value)
    }

    fn from_bulk(bytes: Option<&[u8]>) -> Option<Result<Self>> {
        Some(Ok(Value::from_bulk_bytes(bytes)))
    }

    fn bulk_always_converts() -> bool {
        true
    }
}

/// `()` accepts any reply that is not an error (`+OK`, `:1`, ...).
impl FromValue for () {
    fn from_value(value: Value) -> Result<Self> {
        match value.strip_attributes() {
            v @ Value::Error { .. } => mismatch("()", &v),
            _ => Ok(()),
        }
    }

    fn from_shared(value: &Value) -> Option<Result<Self>> {
        match value {
            Value::Error { .. } | Value::Attribute { .. } => None,
            _ => Some(Ok(())),
        }
    }
}

fn text_of(value: &Value) -> Option<&[u8]> {
    match value {
        Value::BulkString(b) => Some(b),
        Value::SimpleString(s) | Value::BigNumber(s) => Some(s.as_bytes()),
        Value::Verbatim { text, .. } => Some(text),
        _ => None,
    }
}

macro_rules! int_from_value {
    ($($t:ty),*) => {$(
        impl FromValue for $t {
            fn from_value(value: Value) -> Result<Self> {
                let value = value.strip_attributes();
                let wide: Option<i128> = match &value {
                    Value::Int(i) => Some(i128::from(*i)),
                    Value::Boolean(b) => Some(i128::from(*b)),
                    Value::Double(d) if d.fract() == 0.0 && d.abs() < 1e38 => Some(*d as i128),
                    v => text_of(v)
                        .and_then(|t| std::str::from_utf8(t).ok())
                        .and_then(|s| s.parse::<i128>().ok()),
                };
                match wide.and_then(|w| <$t>::try_from(w).ok()) {
                    Some(n) => Ok(n),
                    None => mismatch(stringify!($t), &value),
                }
            }
        }
    )*};
}
int_from_value!(i8, i16, i32, i64, i128, isize, u16, u32, u64, u128, usize);

/// `u8` converts from an integer; `Vec<u8>` takes a bulk string's bytes.
impl FromValue for u8 {
    fn from_value(value: Value) -> Result<Self> {
        let value = value.strip_attributes();
        match &value {
            Value::Int(i) => u8::try_from(*i).or_else(|_| mismatch("u8", &value)),
            _ => mismatch("u8", &value),
        }
    }
    fn from_byte_vec(bytes: Vec<u8>) -> Option<Vec<u8>> {
        Some(bytes)
    }
}

macro_rules! float_from_value {
    ($($t:ty),*) => {$(
        impl FromValue for $t {
            fn from_value(value: Value) -> Result<Self> {
                let value = value.strip_attributes();
                let parsed = match &value {
                    Value::Double(d) => Some(*d as $t),
                    Value::Int(i) => Some(*i as $t),
                    v => text_of(v).and_then(|t| std::str::from_utf8(t).ok()).and_then(parse_float).map(|d| d as $t),
                };
                match parsed {
                    Some(d) => Ok(d),
                    None => mismatch(stringify!($t), &value),
                }
            }
        }
    )*};
}
float_from_value!(f32, f64);

/// Parses Redis' float text: `inf`, `-inf`, `+inf`, `nan` and decimals.
fn parse_float(s: &str) -> Option<f64> {
    match s {
        "inf" | "+inf" => Some(f64::INFINITY),
        "-inf" => Some(f64::NEG_INFINITY),
        _ => s.parse().ok(),
    }
}

/// `bool` from integers 0/1, RESP3 booleans, `OK`, and nil (false).
impl FromValue for bool {
    fn from_value(value: Value) -> Result<Self> {
        let value = value.strip_attributes();
        match &value {
            Value::Boolean(b) => Ok(*b),
            Value::Int(0) | Value::Nil => Ok(false),
            Value::Int(1) => Ok(true),
            Value::SimpleString(s) if s == "OK" => Ok(true),
            Value::BulkString(b) if b == b"0" => Ok(false),
            Value::BulkString(b) if b == b"1" => Ok(true),
            _ => mismatch("bool", &value),
        }
    }
}

fn utf8_string(bytes: Vec<u8>) -> Result<String> {
    String::from_utf8(bytes)
        .map_err(|e| Error::type_mismatch("String", format!("bulk string that is not UTF-8 ({e})")))
}

impl FromValue for String {
    fn from_value(value: Value) -> Result<Self> {
        let value = value.strip_attributes();
        match value {
            Value::BulkString(b) | Value::Verbatim { text: b, .. } => utf8_string(b),
            Value::SimpleString(s) | Value::BigNumber(s) => Ok(s),
            Value::Int(i) => Ok(i.to_string()),
            Value::Double(d) => Ok(crate::resp::format_double(d)),
            v => mismatch("String", &v),
        }
    }

    fn from_bulk(bytes: Option<&[u8]>) -> Option<Result<Self>> {
        bytes.map(|b| utf8_string(b.to_vec()))
    }
}

impl<T: FromValue> FromValue for Option<T> {
    fn from_value(value: Value) -> Result<Self> {
        match value.strip_attributes() {
            Value::Nil => Ok(None),
            v => T::from_value(v).map(Some),
        }
    }

    fn from_bulk(bytes: Option<&[u8]>) -> Option<Result<Self>> {
        match bytes {
            None => Some(Ok(None)),
            Some(_) => T::from_bulk(bytes).map(|r| r.map(Some)),
        }
    }

    fn bulk_always_converts() -> bool {
        T::bulk_always_converts()
    }
}

impl<T: FromValue> FromValue for Box<T> {
    fn from_value(value: Value) -> Result<Self> {
        T::from_value(value).map(Box::new)
    }
}

/// The elements of any aggregate as one list; a map's pairs are flattened,
/// as RESP2 sends them.
fn elements(value: Value, expected: &'static str) -> Result<Vec<Value>> {
    match value.strip_attributes() {
        Value::Array(items) | Value::Set(items) | Value::Push(items) => Ok(items),
        Value::Map(pairs) => Ok(pairs.into_iter().flat_map(|(k, v)| [k, v]).collect()),
        Value::Nil => Ok(Vec::new()),
        v => mismatch(expected, &v),
    }
}

/// Converts a list of elements, grouping a flat list into tuples when `T` is
/// a tuple and the elements are not already grouped.
fn collect<T: FromValue, C: FromIterator<T>>(items: Vec<Value>) -> Result<C> {
    if let Some(arity) = T::tuple_arity() {
        let flat = items.first().is_some_and(|v| !is_aggregate(v));
        if flat {
            if items.len() % arity != 0 {
                return Err(Error::type_mismatch(
                    std::any::type_name::<T>(),
                    format!("array of {} (not a multiple of {arity})", items.len()),
                ));
            }
            let mut iter = items.into_iter();
            let mut out = Vec::new();
            loop {
                let chunk: Vec<Value> = iter.by_ref().take(arity).collect();
                if chunk.is_empty() {
                    break;
                }
                out.push(T::from_value(Value::Array(chunk))?);
            }
            return Ok(out.into_iter().collect());
        }
    }
    items.into_iter().map(T::from_value).collect()
}

fn is_aggregate(v: &Value) -> bool {
    matches!(
        v,
        Value::Array(_) | Value::Set(_) | Value::Map(_) | Value::Push(_)
    )
}

impl<T: FromValue> FromValue for Vec<T> {
    fn from_value(value: Value) -> Result<Self> {
        match value.strip_attributes() {
            Value::BulkString(b) => match T::from_byte_vec(b) {
                Some(v) => Ok(v),
                None => mismatch("Vec", &Value::BulkString(Vec::new())),
            },
            Value::SimpleString(s) => match T::from_byte_vec(s.clone().into_bytes()) {
                Some(v) => Ok(v),
                None => mismatch("Vec", &Value::SimpleString(s)),
            },
            Value::Verbatim { text, format } => match T::from_byte_vec(text) {
                Some(v) => Ok(v),
                None => mismatch(
                    "Vec",
                    &Value::Verbatim {
                        format,
                        text: Vec::new(),
                    },
                ),
            },
            v => collect(elements(v, "Vec")?),
        }
    }

    fn from_bulk(bytes: Option<&[u8]>) -> Option<Result<Self>> {
        match bytes {
            // Only `Vec<u8>` takes a bulk string whole; others convert
            // through the value.
            Some(b) if Self::bulk_always_converts() => T::from_byte_vec(b.to_vec()).map(Ok),
            Some(_) => None,
            None => Some(Ok(Vec::new())),
        }
    }

    /// Only for `Vec<u8>` (the empty probe costs no allocation).
    fn bulk_always_converts() -> bool {
        T::from_byte_vec(Vec::new()).is_some()
    }
}

impl<T: FromValue + Eq + Hash, S: BuildHasher + Default + Send> FromValue for HashSet<T, S> {
    fn from_value(value: Value) -> Result<Self> {
        collect(elements(value, "HashSet")?)
    }
}

impl<T: FromValue + Ord> FromValue for BTreeSet<T> {
    fn from_value(value: Value) -> Result<Self> {
        collect(elements(value, "BTreeSet")?)
    }
}

/// The pairs of a RESP3 map, or of a flat RESP2 array `[k1, v1, k2, v2, ...]`.
fn pairs<K: FromValue, V: FromValue>(value: Value, expected: &'static str) -> Result<Vec<(K, V)>> {
    let pairs = match value.strip_attributes() {
        Value::Map(pairs) => pairs,
        Value::Nil => Vec::new(),
        // RESP3 sends some pair lists as an array of two-element arrays
        // (`ZRANGE ... WITHSCORES`, `HRANDFIELD ... WITHVALUES`).
        Value::Array(items)
            if !items.is_empty()
                && items
                    .iter()
                    .all(|i| matches!(i, Value::Array(p) if p.len() == 2)) =>
        {
            let mut out = Vec::with_capacity(items.len());
            for item in items {
                if let Value::Array(pair) = item {
                    let mut pair = pair.into_iter();
                    if let (Some(k), Some(v)) = (pair.next(), pair.next()) {
                        out.push((k, v));
                    }
                }
            }
            out
        }
        Value::Array(items) => {
            if items.len() % 2 != 0 {
                return Err(Error::type_mismatch(
                    expected,
                    format!("array of {} (odd length)", items.len()),
                ));
            }
            let mut out = Vec::with_capacity(items.len() / 2);
            let mut iter = items.into_iter();
            while let (Some(k), Some(v)) = (iter.next(), iter.next()) {
                out.push((k, v));
            }
            out
        }
        v => return mismatch(expected, &v),
    };
    pairs
        .into_iter()
        .map(|(k, v)| Ok((K::from_value(k)?, V::from_value(v)?)))
        .collect()
}

impl<K: FromValue + Eq + Hash, V: FromValue, S: BuildHasher + Default + Send> FromValue
    for HashMap<K, V, S>
{
    fn from_value(value: Value) -> Result<Self> {
        Ok(pairs(value, "HashMap")?.into_iter().collect())
    }
}

impl<K: FromValue + Ord, V: FromValue> FromValue for BTreeMap<K, V> {
    fn from_value(value: Value) -> Result<Self> {
        Ok(pairs(value, "BTreeMap")?.into_iter().collect())
    }
}

macro_rules! tuple_from_value {
    ($n:expr; $($t:ident),+) => {
        impl<$($t: FromValue),+> FromValue for ($($t,)+) {
            fn from_value(value: Value) -> Result<Self> {
                let items = elements(value, concat!("tuple of ", stringify!($n)))?;
                if items.len() != $n {
                    return Err(Error::type_mismatch(
                        concat!("tuple of ", stringify!($n)),
                        format!("array of {}", items.len()),
                    ));
                }
                let mut iter = items.into_iter();
                Ok(($(
                    $t::from_value(iter.next().unwrap_or(Value::Nil))?,
                )+))
            }
            fn tuple_arity() -> Option<usize> {
                Some($n)
            }
        }
    };
}
tuple_from_value!(1; A);
tuple_from_value!(2; A, B);
tuple_from_value!(3; A, B, C);
tuple_from_value!(4; A, B, C, D);
tuple_from_value!(5; A, B, C, D, E);
tuple_from_value!(6; A, B, C, D, E, F);

/// Converts a reply, attaching nothing: the engine adds host and command.
///
/// # Errors
///
/// As [`FromValue::from_value`].
pub fn from_value<T: FromValue>(value: Value) -> Result<T> {
    T::from_value(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `from_bulk` is a shortcut only: where it answers, it answers what
    /// `from_value` answers for the same bulk string or nil.
    #[test]
    fn from_bulk_agrees_with_from_value() {
        fn check<T: FromValue + std::fmt::Debug>(name: &str) {
            for bytes in [
                None,
                Some(&b""[..]),
                Some(b"abc"),
                Some(b"12"),
                Some(b"\xff\xfe"),
            ] {
                let value = Value::from_bulk_bytes(bytes);
                if T::bulk_always_converts() {
                    assert!(
                        matches!(T::from_bulk(bytes), Some(Ok(_))),
                        "{name} from {bytes:?}: said to always convert"
                    );
                }
                if let Some(fast) = T::from_bulk(bytes) {
                    assert_eq!(
                        format!("{fast:?}"),
                        format!("{:?}", T::from_value(value)),
                        "{name} from {bytes:?}"
                    );
                }
            }
        }
        check::<Value>("Value");
        check::<Vec<u8>>("Vec<u8>");
        check::<Option<Vec<u8>>>("Option<Vec<u8>>");
        check::<String>("String");
        check::<Option<String>>("Option<String>");
        check::<Option<Value>>("Option<Value>");
        check::<Vec<String>>("Vec<String>");
        check::<Option<i64>>("Option<i64>");
        check::<i64>("i64");
        assert!(
            <Option<Vec<u8>>>::from_bulk(Some(b"x")).is_some(),
            "the GET path is taken"
        );
        assert!(
            <Vec<String>>::from_bulk(Some(b"x")).is_none(),
            "others convert the value"
        );
        // Only the bytes' types leave their conversion to the taker.
        assert!(<Option<Vec<u8>>>::bulk_always_converts());
        assert!(<Vec<u8>>::bulk_always_converts());
        assert!(Value::bulk_always_converts());
        assert!(!String::bulk_always_converts(), "UTF-8 may fail");
        assert!(!i64::bulk_always_converts());
        assert!(!<Vec<String>>::bulk_always_converts());
        assert!(!<Option<i64>>::bulk_always_converts());
    }

    fn bulk(s: &str) -> Value {
        Value::BulkString(s.as_bytes().to_vec())
    }

    #[test]
    fn scalars() {
        assert_eq!(i64::from_value(Value::Int(5)).unwrap(), 5);
        assert_eq!(i64::from_value(bulk("-7")).unwrap(), -7);
        assert!(u8::from_value(Value::Int(300)).is_err());
        assert!(i32::from_value(Value::Int(i64::MAX)).is_err());
        assert!(i64::from_value(bulk("abc")).is_err());
        assert_eq!(f64::from_value(bulk("1.5")).unwrap(), 1.5);
        assert_eq!(f64::from_value(bulk("-inf")).unwrap(), f64::NEG_INFINITY);
        assert_eq!(f64::from_value(Value::Double(2.5)).unwrap(), 2.5);
        assert!(bool::from_value(Value::Int(1)).unwrap());
        assert!(bool::from_value(Value::SimpleString("OK".into())).unwrap());
        assert_eq!(String::from_value(bulk("hé")).unwrap(), "hé");
        assert!(String::from_value(Value::BulkString(vec![0xff])).is_err());
        assert_eq!(Vec::<u8>::from_value(bulk("raw")).unwrap(), b"raw");
        assert_eq!(Option::<Vec<u8>>::from_value(Value::Nil).unwrap(), None);
        assert_eq!(
            <()>::from_value(Value::SimpleString("OK".into())).unwrap(),
            ()
        );
    }

    #[test]
    fn error_reply_is_server_error() {
        let e = i64::from_value(Value::Error {
            code: "WRONGTYPE".into(),
            message: "no".into(),
        })
        .unwrap_err();
        assert_eq!(e.code(), Some("WRONGTYPE"));
        let e = <()>::from_value(Value::Error {
            code: "ERR".into(),
            message: "x".into(),
        })
        .unwrap_err();
        assert_eq!(e.code(), Some("ERR"));
    }

    #[test]
    fn aggregates_resp2_and_resp3_alike() {
        let resp2 = Value::Array(vec![bulk("a"), bulk("1"), bulk("b"), bulk("2")]);
        let resp3 = Value::Map(vec![(bulk("a"), bulk("1")), (bulk("b"), bulk("2"))]);
        let m2: HashMap<String, i64> = from_value(resp2.clone()).unwrap();
        let m3: HashMap<String, i64> = from_value(resp3).unwrap();
        assert_eq!(m2, m3);
        assert_eq!(m2["b"], 2);

        let nested = Value::Array(vec![
            Value::Array(vec![bulk("a"), Value::Double(1.0)]),
            Value::Array(vec![bulk("b"), Value::Double(2.0)]),
        ]);
        let m3: HashMap<String, f64> = from_value(nested).unwrap();
        assert_eq!(m3["b"], 2.0);

        let flat: Vec<(String, f64)> = from_value(resp2).unwrap();
        assert_eq!(flat, vec![("a".into(), 1.0), ("b".into(), 2.0)]);
        let grouped = Value::Array(vec![
            Value::Array(vec![bulk("a"), Value::Double(1.0)]),
            Value::Array(vec![bulk("b"), Value::Double(2.0)]),
        ]);
        let pairs: Vec<(String, f64)> = from_value(grouped).unwrap();
        assert_eq!(pairs, flat);

        let set: HashSet<Vec<u8>> = from_value(Value::Set(vec![bulk("x"), bulk("y")])).unwrap();
        assert!(set.contains(b"x".as_slice()));
        let list: Vec<Option<String>> =
            from_value(Value::Array(vec![bulk("x"), Value::Nil])).unwrap();
        assert_eq!(list, vec![Some("x".into()), None]);
        let t: (i64, String) = from_value(Value::Array(vec![Value::Int(1), bulk("x")])).unwrap();
        assert_eq!(t, (1, "x".into()));
    }

    #[test]
    fn mismatches_are_errors() {
        assert!(HashMap::<String, String>::from_value(Value::Array(vec![bulk("odd")])).is_err());
        assert!(<(i64, i64)>::from_value(Value::Array(vec![Value::Int(1)])).is_err());
        assert!(Vec::<(i64, i64)>::from_value(Value::Array(vec![Value::Int(1)])).is_err());
        assert!(Vec::<i64>::from_value(Value::Int(1)).is_err());
        let e = i64::from_value(Value::Array(vec![])).unwrap_err();
        assert!(
            e.to_string()
                .contains("cannot convert reply array of 0 to i64"),
            "{e}"
        );
    }

    #[test]
    fn attributes_are_transparent() {
        let v = Value::Attribute {
            attributes: vec![],
            value: Box::new(Value::Int(3)),
        };
        assert_eq!(i64::from_value(v).unwrap(), 3);
    }
}
