#![no_main]
//! The unframed decoder (struct skip-walk), Binary and Compact, with a small depth limit.
use fnmesh_codec::{Detected, FrameDecoder, Limits, Protocol};
use libfuzzer_sys::fuzz_target;

#[path = "common.rs"]
mod common;

fuzz_target!(|data: &[u8]| {
    let Some((&pick, rest)) = data.split_first() else {
        return;
    };
    let protocol = if pick & 1 == 0 {
        Protocol::Binary
    } else {
        Protocol::Compact
    };
    let limits = Limits {
        max_frame_size: 1 << 20,
        max_depth: 16,
        ..Limits::default()
    };
    let chunk = usize::from(pick >> 1).max(1);
    common::exercise(
        FrameDecoder::for_transport(Detected::Unframed(protocol), limits),
        rest,
        chunk,
    );
});
