//! A `ReplyStream` that splits announced arrays element by element, fed
//! the input in chunks, yields the same replies (split arrays put back
//! together) as one-shot `decode`, and fails where it fails. The input's
//! first two bytes pick the chunk sizes (see `common::split_stream_input`).
#![no_main]

use libfuzzer_sys::fuzz_target;

mod common;

fuzz_target!(|data: &[u8]| {
    let (sizes, body) = common::split_stream_input(data);
    common::check_split(body, &sizes);
});
