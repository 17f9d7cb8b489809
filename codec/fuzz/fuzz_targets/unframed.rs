#![no_main]
//! The unframed decoder (struct skip-walk), Binary and Compact, with a small depth limit.
use fnmesh_codec::{Detected, FrameDecoder, Limits};
use libfuzzer_sys::fuzz_target;

#[path = "common.rs"]
mod common;

fuzz_target!(|data: &[u8]| {
    let Some((protocol, chunk, rest)) = common::split_protocol(data) else {
        return;
    };
    let limits = Limits {
        max_frame_size: 1 << 20,
        max_depth: 16,
        ..Limits::default()
    };
    let decoder = FrameDecoder::for_transport(Detected::Unframed(protocol), limits);
    common::exercise(decoder, rest, usize::from(chunk).max(1));
});
