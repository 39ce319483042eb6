//! Replays every input under `fuzz/regressions/*/` on stable Rust, as a
//! unit test (the checks need the decoder's internals, which are not public) through the
//! fuzz targets' own checks (`fuzz/fuzz_targets/common/mod.rs`): one-shot
//! decode plus re-encode round trip, and streaming decode (plain and with
//! arrays split) in 1-byte and 7-byte chunks agreeing with one-shot
//! decoding. Inputs of `decode_stream` and `decode_split` are also replayed
//! exactly as those targets read them (chunk sizes from the header).

use std::fs;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

// The fuzz targets' checks name the crate `rb` (lib.rs declares
// `extern crate self as rb` for tests) and its internals `rb::fuzzing`.
#[path = "../fuzz/fuzz_targets/common/mod.rs"]
mod common;

/// Targets whose folders must exist and hold at least one input each.
const TARGETS: [&str; 4] = [
    "decode_oneshot",
    "decode_stream",
    "decode_split",
    "roundtrip",
];

fn regressions_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/regressions")
}

/// Every `(target, file)` under the regressions folder, sorted.
fn inputs() -> Vec<(String, PathBuf)> {
    let root = regressions_dir();
    let mut found = Vec::new();
    let dirs = fs::read_dir(&root).unwrap_or_else(|e| panic!("{} is missing: {e}", root.display()));
    for dir in dirs {
        let dir = dir.unwrap().path();
        if !dir.is_dir() {
            continue;
        }
        let target = dir.file_name().unwrap().to_string_lossy().into_owned();
        for file in fs::read_dir(&dir).unwrap() {
            let file = file.unwrap().path();
            if file.is_file() {
                found.push((target.clone(), file));
            }
        }
    }
    found.sort();
    found
}

fn replay(target: &str, data: &[u8]) {
    common::check_oneshot(data);
    common::check_stream(data, &[1]);
    common::check_stream(data, &[7]);
    common::check_split(data, &[1]);
    common::check_split(data, &[7]);
    if target == "decode_stream" || target == "decode_split" {
        let (sizes, body) = common::split_stream_input(data);
        common::check_oneshot(body);
        common::check_stream(body, &sizes);
        common::check_split(body, &sizes);
    }
}

#[test]
fn every_regression_input_passes_the_fuzz_checks() {
    let inputs = inputs();
    for target in TARGETS {
        let count = inputs.iter().filter(|(t, _)| t == target).count();
        assert!(
            count > 0,
            "no inputs in {}/{target}: the replay would test nothing",
            regressions_dir().display()
        );
    }
    let mut failed = Vec::new();
    for (target, file) in &inputs {
        let data = fs::read(file).unwrap();
        if catch_unwind(AssertUnwindSafe(|| replay(target, &data))).is_err() {
            failed.push(file.display().to_string());
        }
    }
    assert!(
        failed.is_empty(),
        "{} of {} inputs failed (panic messages above):\n{}",
        failed.len(),
        inputs.len(),
        failed.join("\n")
    );
}

/// The shared checks do catch a disagreement: a sanity check of the harness.
#[test]
fn the_checks_are_not_vacuous() {
    use rb::Value;
    assert!(common::same(
        &Value::Double(f64::NAN),
        &Value::Double(-f64::NAN)
    ));
    assert!(!common::same(&Value::Double(0.5), &Value::Double(1.5)));
    let (values, end) = common::stream_all(b"+a\r\n:1\r\n$1\r\nx", &[1]);
    assert_eq!(values.len(), 2);
    assert_eq!(end, common::End::Incomplete(5));
    let (values, end) = common::oneshot_all(b":1\r\n#x\r\n:2\r\n");
    assert_eq!(values, [Value::Int(1)]);
    assert_eq!(end, common::End::Error);
}
