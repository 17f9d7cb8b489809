#![no_main]
//! Arbitrary caller bytes (any transport the listener detects: TTHeader, Framed, unframed Binary
//! or Compact) against a whole sidecar whose Thrift function is the example echo function: no
//! panic on any thread, memory within libFuzzer's RSS limit.
use libfuzzer_sys::fuzz_target;

#[path = "sidecar.rs"]
#[allow(dead_code)]
mod sidecar;

fuzz_target!(init: sidecar::watchdog_or_nothing(), |data: &[u8]| {
    sidecar::exchange(data, std::time::Duration::from_millis(20));
});
