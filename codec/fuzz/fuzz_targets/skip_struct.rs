#![no_main]
//! The struct walk alone: it must end, and never claim more bytes than it was given.
use fnmesh_codec::{skip_struct, Limits};
use libfuzzer_sys::fuzz_target;

#[path = "common.rs"]
mod common;

fuzz_target!(|data: &[u8]| {
    let Some((protocol, _, rest)) = common::split_protocol(data) else {
        return;
    };
    let limits = Limits {
        max_depth: 32,
        ..Limits::default()
    };
    if let Ok(Some(end)) = skip_struct(rest, 0, protocol, &limits) {
        assert!(end <= rest.len());
    }
});
