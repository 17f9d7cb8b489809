//! HPACK property tests: any header list the encoder writes decodes to itself, in order and
//! with its "never indexed" marks, on a connection whose table the decoder keeps; and no byte
//! string makes the decoder panic or outgrow its limits.

use fnmesh_codec::hpack::{encode_field, Decoder};
use proptest::prelude::*;

fn field() -> impl Strategy<Value = (Vec<u8>, Vec<u8>, bool)> {
    let name = prop_oneof![
        Just(b":path".to_vec()),
        Just(b":method".to_vec()),
        Just(b":status".to_vec()),
        Just(b"content-type".to_vec()),
        Just(b"grpc-status".to_vec()),
        proptest::collection::vec(any::<u8>(), 0..40),
    ];
    let value = prop_oneof![
        Just(b"POST".to_vec()),
        Just(b"200".to_vec()),
        Just(Vec::new()),
        proptest::collection::vec(any::<u8>(), 0..300),
    ];
    (name, value, any::<bool>())
}

proptest! {
    #[test]
    fn encoded_lists_decode_to_themselves(
        blocks in proptest::collection::vec(proptest::collection::vec(field(), 0..12), 1..4)
    ) {
        let mut d = Decoder::new(4096, 1 << 20);
        for list in blocks {
            let mut block = Vec::new();
            for (n, v, s) in &list {
                encode_field(&mut block, n, v, *s);
            }
            let mut got = Vec::new();
            d.decode(&block, |f| got.push((f.name.to_vec(), f.value.to_vec(), f.sensitive)))
                .unwrap();
            prop_assert_eq!(got, list);
        }
    }

    #[test]
    fn any_bytes_end_in_fields_or_an_error(
        blocks in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..64), 1..6)
    ) {
        let mut d = Decoder::new(128, 512);
        for block in blocks {
            let mut list = 0;
            if d.decode(&block, |f| list += f.name.len() + f.value.len() + 32).is_ok() {
                prop_assert!(list <= 512);
            }
            prop_assert!(d.table_size() <= 128);
        }
    }
}
