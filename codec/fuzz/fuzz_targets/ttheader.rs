#![no_main]
//! The TTHeader decoder on its own (binary or compact payloads).
use fnmesh_codec::{Detected, FrameDecoder, Limits};
use libfuzzer_sys::fuzz_target;

#[path = "common.rs"]
mod common;

fuzz_target!(|data: &[u8]| {
    let limits = Limits {
        max_frame_size: 1 << 20,
        ..Limits::default()
    };
    common::exercise(
        FrameDecoder::for_transport(Detected::TTHeader, limits),
        data,
        data.len(),
    );
});
