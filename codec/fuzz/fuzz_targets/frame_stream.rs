#![no_main]
//! The auto-detecting decoder, fed in chunks whose size the input picks.
use fnmesh_codec::{FrameDecoder, Limits};
use libfuzzer_sys::fuzz_target;

#[path = "common.rs"]
mod common;

fuzz_target!(|data: &[u8]| {
    let Some((&chunk, rest)) = data.split_first() else {
        return;
    };
    let limits = Limits {
        max_frame_size: 1 << 20,
        ..Limits::default()
    };
    common::exercise(FrameDecoder::new(limits), rest, usize::from(chunk));
});
