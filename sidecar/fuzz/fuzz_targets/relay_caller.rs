#![no_main]
//! Arbitrary caller bytes after the HTTP/2 preface, against a whole sidecar whose gRPC function
//! is the example echo function: no panic on any thread (the sidecar's panics abort), memory
//! within libFuzzer's RSS limit.
use libfuzzer_sys::fuzz_target;

#[path = "sidecar.rs"]
#[allow(dead_code)]
mod sidecar;

fuzz_target!(init: sidecar::watchdog_or_nothing(), |data: &[u8]| {
    let mut bytes = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    bytes.extend_from_slice(data);
    sidecar::exchange(&bytes, std::time::Duration::from_millis(20));
});
