#![no_main]
//! The Framed decoder, Binary and Compact.
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
        ..Limits::default()
    };
    common::exercise(
        FrameDecoder::for_transport(Detected::Framed(protocol), limits),
        rest,
        rest.len(),
    );
});
