#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // Detection on every prefix must be consistent: once found, longer prefixes agree.
    let mut found = None;
    for n in 0..=data.len().min(64) {
        if let fnmesh_codec::Detection::Found(d) = fnmesh_codec::detect(&data[..n]) {
            if let Some(prev) = found {
                assert_eq!(prev, d);
            }
            found = Some(d);
        }
    }
});
