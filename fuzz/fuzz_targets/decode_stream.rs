//! A streaming `Decoder` fed the input in chunks over a growing read buffer
//! (consumed replies drained) yields the same replies, and ends the same way,
//! as repeated one-shot `decode` over the whole buffer. The input's first two
//! bytes pick the chunk sizes (see `common::split_stream_input`).
#![no_main]

use libfuzzer_sys::fuzz_target;

mod common;

fuzz_target!(|data: &[u8]| {
    let (sizes, body) = common::split_stream_input(data);
    common::check_stream(body, &sizes);
});
