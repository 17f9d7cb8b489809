#![no_main]
use fnmesh_codec::hpack::Decoder;
use libfuzzer_sys::fuzz_target;

/// RFC 9113 8.2.1, written out again: a name of lowercase visible characters (a colon only
/// first), a value without NUL, CR or LF and without whitespace at either end.
fn valid(name: &[u8], value: &[u8]) -> bool {
    let plain = |b: &u8| (0x21..=0x7e).contains(b) && !b.is_ascii_uppercase() && *b != b':';
    let name_ok = match name.split_first() {
        Some((first, rest)) => (plain(first) || *first == b':') && rest.iter().all(plain),
        None => false,
    };
    let edge = |b: Option<&u8>| matches!(b, Some(b' ' | b'\t'));
    let value_ok = !edge(value.first())
        && !edge(value.last())
        && !value.iter().any(|b| matches!(b, 0 | b'\r' | b'\n'));
    name_ok && value_ok
}

fuzz_target!(|data: &[u8]| {
    // The input split into header blocks at each 0xfe byte, decoded one after another on one
    // connection, so table state carries over. Never a panic; the table stays within its limit;
    // each field's `valid` is what the RFC's rules say of its bytes (also for fields taken from
    // the dynamic table, whose validity was found when they were added).
    let mut d = Decoder::new(256, 8192);
    for block in data.split(|&b| b == 0xfe) {
        let mut list = 0;
        if d
            .decode(block, |f| {
                list += f.name.len() + f.value.len() + 32;
                assert_eq!(f.valid, valid(f.name, f.value), "{f:?}");
            })
            .is_ok()
        {
            assert!(list <= 8192);
        }
        assert!(d.table_size() <= 256);
    }
});
