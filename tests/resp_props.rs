//! Property tests of the RESP codec: random `Value` trees of every variant
//! round-trip through `Value::encode` and both decoders, whole or in pieces.

use proptest::prelude::*;
use proptest::test_runner::Config;
use rb::resp::{decode, Decoder};
use rb::Value;

/// Bytes, biased towards the ones that matter to RESP framing.
fn bytes() -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(
        prop_oneof![
            3 => any::<u8>(),
            1 => prop::sample::select(&b"\r\n$*:+-_%~|>!=,#(\0"[..]),
        ],
        0..24,
    )
}

/// Text without CR or LF: simple strings and error messages.
fn line_text() -> impl Strategy<Value = String> {
    "[^\r\n]{0,16}"
}

/// Finite doubles of every class (zero, subnormal, normal) and the infinities.
/// NaN is left out: it is not equal to itself.
fn double() -> impl Strategy<Value = f64> {
    use prop::num::f64 as class;
    prop_oneof![
        8 => class::POSITIVE | class::NEGATIVE | class::NORMAL | class::SUBNORMAL | class::ZERO,
        1 => Just(f64::INFINITY),
        1 => Just(f64::NEG_INFINITY),
        1 => prop::sample::select(vec![0.1, -0.0, 1e300, 5e-324, 1e16, 123456.789]),
    ]
}

fn leaf() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Nil),
        any::<i64>().prop_map(Value::Int),
        bytes().prop_map(Value::BulkString),
        line_text().prop_map(Value::SimpleString),
        // Messages with CR or LF go out as blob errors (`!`), the rest as `-` lines.
        (
            "[A-Z]{1,10}",
            prop_oneof![3 => line_text(), 1 => "[a-z \r\n]{0,12}"]
        )
            .prop_map(|(code, message)| Value::Error { code, message }),
        double().prop_map(Value::Double),
        any::<bool>().prop_map(Value::Boolean),
        "0|-?[1-9][0-9]{0,40}".prop_map(Value::BigNumber),
        ("[a-z]{3}", bytes()).prop_map(|(format, text)| Value::Verbatim { format, text }),
    ]
}

/// A `Value` tree of every variant, at most 4 aggregates deep. Attributes
/// may wrap any value, attributes included: the decoder reads `|` pairs and
/// then whatever value follows, so nested attributes round-trip too.
fn value() -> impl Strategy<Value = Value> {
    leaf().prop_recursive(4, 48, 5, |inner| {
        let items = prop::collection::vec(inner.clone(), 0..5);
        let pairs = prop::collection::vec((inner.clone(), inner.clone()), 0..4);
        prop_oneof![
            items.clone().prop_map(Value::Array),
            items.clone().prop_map(Value::Set),
            items.prop_map(Value::Push),
            pairs.clone().prop_map(Value::Map),
            (pairs, inner).prop_map(|(attributes, value)| Value::Attribute {
                attributes,
                value: Box::new(value),
            }),
        ]
    })
}

fn encoded(v: &Value) -> Vec<u8> {
    let mut buf = Vec::new();
    v.encode(&mut buf);
    buf
}

fn config(cases: u32) -> Config {
    Config {
        cases,
        // Shrunk failures are printed; no files are written beside the tests.
        failure_persistence: None,
        ..Config::default()
    }
}

proptest! {
    #![proptest_config(config(256))]

    #[test]
    fn one_shot_round_trip(v in value()) {
        let buf = encoded(&v);
        prop_assert_eq!(decode(&buf).unwrap(), Some((v, buf.len())));
    }

    #[test]
    fn streaming_in_random_chunks(v in value(), chunks in prop::collection::vec(1usize..40, 1..64)) {
        let buf = encoded(&v);
        let mut d = Decoder::new();
        let mut end = 0;
        let mut sizes = chunks.iter().cycle();
        while end < buf.len() {
            // Every call on a strict prefix asks for more bytes.
            prop_assert_eq!(d.decode(&buf[..end]).unwrap(), None, "at {}", end);
            end = (end + sizes.next().unwrap()).min(buf.len());
        }
        prop_assert_eq!(d.decode(&buf).unwrap(), Some((v, buf.len())));
    }

    #[test]
    fn back_to_back_values_decode_one_after_another(
        values in prop::collection::vec(value(), 1..6),
        chunks in prop::collection::vec(1usize..64, 1..32),
    ) {
        let mut wire = Vec::new();
        for v in &values {
            v.encode(&mut wire);
        }
        // One-shot, advancing by what each call consumed.
        let mut at = 0;
        for v in &values {
            let (got, n) = decode(&wire[at..]).unwrap().expect("a whole value");
            prop_assert_eq!(&got, v);
            at += n;
        }
        prop_assert_eq!(at, wire.len());
        prop_assert_eq!(decode(&wire[at..]).unwrap(), None);

        // Streaming: a read buffer that grows by chunks and drops each reply
        // as soon as it is decoded.
        let mut d = Decoder::new();
        let mut pending: &[u8] = &wire;
        let mut buf = Vec::new();
        let mut got = Vec::new();
        let mut sizes = chunks.iter().cycle();
        loop {
            while let Some((v, n)) = d.decode(&buf).unwrap() {
                got.push(v);
                buf.drain(..n);
            }
            if pending.is_empty() {
                break;
            }
            let take = (*sizes.next().unwrap()).min(pending.len());
            buf.extend_from_slice(&pending[..take]);
            pending = &pending[take..];
        }
        prop_assert!(buf.is_empty());
        prop_assert_eq!(got, values);
    }

    #[test]
    fn every_strict_prefix_is_incomplete(v in value()) {
        let buf = encoded(&v);
        for cut in 0..buf.len() {
            prop_assert_eq!(decode(&buf[..cut]).unwrap(), None, "cut at {}", cut);
        }
    }

    #[test]
    fn valid_value_then_garbage_decodes_the_value_first(
        v in value(),
        garbage in prop::collection::vec(any::<u8>(), 0..64),
    ) {
        let mut buf = encoded(&v);
        let n = buf.len();
        buf.extend_from_slice(&garbage);
        prop_assert_eq!(decode(&buf).unwrap(), Some((v, n)));
    }
}

proptest! {
    #![proptest_config(config(2048))]

    #[test]
    fn arbitrary_bytes_never_panic(data in prop::collection::vec(any::<u8>(), 0..128)) {
        let _ = decode(&data);
    }

    /// Bytes made of RESP-looking pieces reach deeper into the decoder than
    /// uniform noise does; whatever they decode to must re-encode to itself.
    #[test]
    fn resp_shaped_bytes_never_panic(
        pieces in prop::collection::vec(
            prop_oneof![
                prop::sample::select(vec![
                    "*1\r\n", "*2\r\n", "*-1\r\n", "*-2\r\n", "%1\r\n", "|1\r\n", "~1\r\n",
                    ">1\r\n", "$3\r\nabc\r\n", "$-1\r\n", "$-5\r\n", ":1\r\n", "+OK\r\n",
                    "-ERR x\r\n", "!3\r\nERR\r\n", "=5\r\ntxt:a\r\n", ",1.5\r\n", ",nan\r\n",
                    "#t\r\n", "(12\r\n", "_\r\n", "\r\n", "\n", "$9223372036854775808\r\n",
                ]).prop_map(|s| s.as_bytes().to_vec()),
                prop::collection::vec(any::<u8>(), 0..4),
            ],
            0..24,
        ),
    ) {
        let data = pieces.concat();
        if let Ok(Some((v, n))) = decode(&data) {
            prop_assert!(n <= data.len());
            let again = encoded(&v);
            let (back, m) = decode(&again).unwrap().expect("re-encoded value is whole");
            prop_assert_eq!(m, again.len());
            prop_assert!(same(&back, &v), "{:?} != {:?}", back, v);
        }
    }
}

/// Equality that takes any NaN as equal to any NaN.
fn same(a: &Value, b: &Value) -> bool {
    use Value::*;
    let all =
        |x: &[Value], y: &[Value]| x.len() == y.len() && x.iter().zip(y).all(|(a, b)| same(a, b));
    let pairs = |x: &[(Value, Value)], y: &[(Value, Value)]| {
        x.len() == y.len()
            && x.iter()
                .zip(y)
                .all(|((ak, av), (bk, bv))| same(ak, bk) && same(av, bv))
    };
    match (a, b) {
        (Double(x), Double(y)) => x == y || (x.is_nan() && y.is_nan()),
        (Array(x), Array(y)) | (Set(x), Set(y)) | (Push(x), Push(y)) => all(x, y),
        (Map(x), Map(y)) => pairs(x, y),
        (
            Attribute {
                attributes: ax,
                value: av,
            },
            Attribute {
                attributes: bx,
                value: bv,
            },
        ) => pairs(ax, bx) && same(av, bv),
        _ => a == b,
    }
}
