#![no_main]
//! The struct walk alone: it must end, and never claim more bytes than it was given.
use fnmesh_codec::{skip_struct, Limits, Protocol};
use libfuzzer_sys::fuzz_target;

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
        max_depth: 32,
        ..Limits::default()
    };
    if let Ok(Some(end)) = skip_struct(rest, 0, protocol, &limits) {
        assert!(end <= rest.len());
    }
});
