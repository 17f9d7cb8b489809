#![no_main]
//! The Framed decoder, Binary and Compact.
use fnmesh_codec::{Detected, FrameDecoder, Limits};
use libfuzzer_sys::fuzz_target;

#[path = "common.rs"]
mod common;

fuzz_target!(|data: &[u8]| {
    let Some((protocol, _, rest)) = common::split_protocol(data) else {
        return;
    };
    let limits = Limits {
        max_frame_size: 1 << 20,
        ..Limits::default()
    };
    let decoder = FrameDecoder::for_transport(Detected::Framed(protocol), limits);
    common::exercise(decoder, rest, rest.len());
});
