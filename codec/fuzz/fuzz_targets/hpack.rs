#![no_main]
use fnmesh_codec::hpack::Decoder;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // The input split into header blocks at each 0xfe byte, decoded one after another on one
    // connection, so table state carries over. Never a panic; the table stays within its limit.
    let mut d = Decoder::new(256, 8192);
    for block in data.split(|&b| b == 0xfe) {
        let mut list = 0;
        if d
            .decode(block, |f| list += f.name.len() + f.value.len() + 32)
            .is_ok()
        {
            assert!(list <= 8192);
        }
        assert!(d.table_size() <= 256);
    }
});
