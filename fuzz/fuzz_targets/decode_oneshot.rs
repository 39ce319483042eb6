//! One-shot `decode` of arbitrary bytes: no panic, `consumed <= len`, and
//! whatever decodes re-encodes and decodes to an equal value (NaN-tolerant).
#![no_main]

use libfuzzer_sys::fuzz_target;

mod common;

fuzz_target!(|data: &[u8]| {
    common::check_oneshot(data);
});
