use super::*;

fn hex(s: &str) -> Vec<u8> {
    let s: String = s.split_whitespace().collect();
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

/// Decodes `block`, giving (name, value, sensitive) of each field.
fn fields(d: &mut Decoder, block: &[u8]) -> Result<Vec<(String, String, bool)>, HpackError> {
    let mut out = Vec::new();
    d.decode(block, |f| {
        out.push((
            String::from_utf8(f.name.to_vec()).unwrap(),
            String::from_utf8(f.value.to_vec()).unwrap(),
            f.sensitive,
        ))
    })?;
    Ok(out)
}

fn plain(list: &[(&str, &str)]) -> Vec<(String, String, bool)> {
    list.iter()
        .map(|(n, v)| (n.to_string(), v.to_string(), false))
        .collect()
}

#[test]
fn integers_follow_rfc7541_c1() {
    let mut b = Vec::new();
    put_integer(&mut b, 0, 5, 10);
    put_integer(&mut b, 0, 5, 1337);
    put_integer(&mut b, 0, 8, 42);
    assert_eq!(b, [0x0a, 0x1f, 0x9a, 0x0a, 0x2a]);
    let mut r = &b[..];
    assert_eq!(integer(&mut r, 5), Ok(10));
    assert_eq!(integer(&mut r, 5), Ok(1337));
    assert_eq!(integer(&mut r, 8), Ok(42));
    assert!(r.is_empty());
    // Five continuation bytes are more than any frame needs.
    assert_eq!(
        integer(&mut &[0x1f, 0xff, 0xff, 0xff, 0xff, 0x01][..], 5),
        Err(HpackError::IntegerOverflow)
    );
    assert_eq!(
        integer(&mut &[0x1f, 0x9a][..], 5),
        Err(HpackError::Truncated)
    );
}

#[test]
fn literal_representations_follow_rfc7541_c2() {
    let mut d = Decoder::new(4096, 1 << 16);
    let block = hex("400a 6375 7374 6f6d 2d6b 6579 0d63 7573 746f 6d2d 6865 6164 6572");
    assert_eq!(
        fields(&mut d, &block),
        Ok(plain(&[("custom-key", "custom-header")]))
    );
    assert_eq!((d.table_len(), d.table_size()), (1, 55));

    let mut d = Decoder::new(4096, 1 << 16);
    let block = hex("040c 2f73 616d 706c 652f 7061 7468");
    assert_eq!(
        fields(&mut d, &block),
        Ok(plain(&[(":path", "/sample/path")]))
    );
    assert_eq!(d.table_len(), 0);

    let mut d = Decoder::new(4096, 1 << 16);
    let block = hex("1008 7061 7373 776f 7264 0673 6563 7265 74");
    assert_eq!(
        fields(&mut d, &block),
        Ok(vec![("password".into(), "secret".into(), true)])
    );
    assert_eq!(d.table_len(), 0);

    let mut d = Decoder::new(4096, 1 << 16);
    assert_eq!(fields(&mut d, &hex("82")), Ok(plain(&[(":method", "GET")])));
}

/// RFC 7541 C.3 (plain) and C.4 (Huffman): three requests on one connection.
#[test]
fn requests_follow_rfc7541_c3_and_c4() {
    let blocks = [
        [
            "8286 8441 0f77 7777 2e65 7861 6d70 6c65 2e63 6f6d",
            "8286 8441 8cf1 e3c2 e5f2 3a6b a0ab 90f4 ff",
        ],
        [
            "8286 84be 5808 6e6f 2d63 6163 6865",
            "8286 84be 5886 a8eb 1064 9cbf",
        ],
        [
            "8287 85bf 400a 6375 7374 6f6d 2d6b 6579 0c63 7573 746f 6d2d 7661 6c75 65",
            "8287 85bf 4088 25a8 49e9 5ba9 7d7f 8925 a849 e95b b8e8 b4bf",
        ],
    ];
    let expected = [
        plain(&[
            (":method", "GET"),
            (":scheme", "http"),
            (":path", "/"),
            (":authority", "www.example.com"),
        ]),
        plain(&[
            (":method", "GET"),
            (":scheme", "http"),
            (":path", "/"),
            (":authority", "www.example.com"),
            ("cache-control", "no-cache"),
        ]),
        plain(&[
            (":method", "GET"),
            (":scheme", "https"),
            (":path", "/index.html"),
            (":authority", "www.example.com"),
            ("custom-key", "custom-value"),
        ]),
    ];
    let sizes = [57, 110, 164];
    for coding in 0..2 {
        let mut d = Decoder::new(4096, 1 << 16);
        for ((pair, want), size) in blocks.iter().zip(&expected).zip(sizes) {
            assert_eq!(fields(&mut d, &hex(pair[coding])), Ok(want.clone()));
            assert_eq!(d.table_size(), size, "coding {coding}");
        }
    }
}

/// RFC 7541 C.5 (plain) and C.6 (Huffman): three responses with a 256-byte table, so entries are
/// evicted.
#[test]
fn responses_follow_rfc7541_c5_and_c6() {
    let blocks = [
        [
            "4803 3330 3258 0770 7269 7661 7465 611d 4d6f 6e2c 2032 3120 4f63 7420 3230 3133 2032 303a 3133 3a32 3120 474d 546e 1768 7474 7073 3a2f 2f77 7777 2e65 7861 6d70 6c65 2e63 6f6d",
            "4882 6402 5885 aec3 771a 4b61 96d0 7abe 9410 54d4 44a8 2005 9504 0b81 66e0 82a6 2d1b ff6e 919d 29ad 1718 63c7 8f0b 97c8 e9ae 82ae 43d3",
        ],
        ["4803 3330 37c1 c0bf", "4883 640e ffc1 c0bf"],
        [
            "88c1 611d 4d6f 6e2c 2032 3120 4f63 7420 3230 3133 2032 303a 3133 3a32 3220 474d 54c0 5a04 677a 6970 7738 666f 6f3d 4153 444a 4b48 514b 425a 584f 5157 454f 5049 5541 5851 5745 4f49 553b 206d 6178 2d61 6765 3d33 3630 303b 2076 6572 7369 6f6e 3d31",
            "88c1 6196 d07a be94 1054 d444 a820 0595 040b 8166 e084 a62d 1bff c05a 839b d9ab 77ad 94e7 821d d7f2 e6c7 b335 dfdf cd5b 3960 d5af 2708 7f36 72c1 ab27 0fb5 291f 9587 3160 65c0 03ed 4ee5 b106 3d50 07",
        ],
    ];
    let date1 = "Mon, 21 Oct 2013 20:13:21 GMT";
    let loc = "https://www.example.com";
    let expected = [
        plain(&[
            (":status", "302"),
            ("cache-control", "private"),
            ("date", date1),
            ("location", loc),
        ]),
        plain(&[
            (":status", "307"),
            ("cache-control", "private"),
            ("date", date1),
            ("location", loc),
        ]),
        plain(&[
            (":status", "200"),
            ("cache-control", "private"),
            ("date", "Mon, 21 Oct 2013 20:13:22 GMT"),
            ("location", loc),
            ("content-encoding", "gzip"),
            (
                "set-cookie",
                "foo=ASDJKHQKBZXOQWEOPIUAXQWEOIU; max-age=3600; version=1",
            ),
        ]),
    ];
    let tables = [(4, 222), (4, 222), (3, 215)];
    for coding in 0..2 {
        let mut d = Decoder::new(256, 1 << 16);
        for ((pair, want), table) in blocks.iter().zip(&expected).zip(tables) {
            assert_eq!(fields(&mut d, &hex(pair[coding])), Ok(want.clone()));
            assert_eq!((d.table_len(), d.table_size()), table, "coding {coding}");
        }
    }
}

#[test]
fn huffman_strings_follow_rfc7541_c4() {
    for (s, coded) in [
        ("www.example.com", "f1e3c2e5f23a6ba0ab90f4ff"),
        ("no-cache", "a8eb10649cbf"),
        ("custom-key", "25a849e95ba97d7f"),
        ("custom-value", "25a849e95bb8e8b4bf"),
    ] {
        let mut out = Vec::new();
        huffman::encode(s.as_bytes(), &mut out);
        assert_eq!(out, hex(coded));
        assert_eq!(huffman::encoded_len(s.as_bytes()), out.len());
        let mut back = Vec::new();
        huffman::decode(&out, &mut back).unwrap();
        assert_eq!(back, s.as_bytes());
    }
}

#[test]
fn every_byte_survives_huffman() {
    let all: Vec<u8> = (0..=255).chain((0..=255).rev()).collect();
    for n in 0..all.len() {
        let mut out = Vec::new();
        huffman::encode(&all[..n], &mut out);
        let mut back = Vec::new();
        huffman::decode(&out, &mut back).unwrap();
        assert_eq!(back, &all[..n]);
    }
}

#[test]
fn bad_huffman_padding_and_eos_are_refused() {
    let mut out = Vec::new();
    // 'a' is 00011 (5 bits): padded with 111.
    huffman::decode(&[0b0001_1111], &mut out).unwrap();
    assert_eq!(out, b"a");
    // Padding of 0s.
    assert!(huffman::decode(&[0b0001_1000], &mut out).is_err());
    // A whole byte of padding.
    assert!(huffman::decode(&[0b0001_1111, 0xff], &mut out).is_err());
    // EOS (30 ones) inside the string.
    assert_eq!(
        huffman::decode(&[0xff, 0xff, 0xff, 0xfc], &mut out),
        Err(HpackError::BadHuffman("EOS inside a string"))
    );
}

#[test]
fn encoded_fields_decode_to_themselves_and_leave_the_table_alone() {
    let list: &[(&str, &str, bool)] = &[
        (":method", "POST", false),
        (":scheme", "http", false),
        (":path", "/echo.Echo/UnaryEcho", false),
        (":authority", "127.0.0.1:8888", false),
        (":status", "200", false),
        (":status", "503", false),
        ("content-type", "application/grpc", false),
        ("te", "trailers", false),
        ("grpc-timeout", "99m", false),
        ("authorization", "Bearer x", true),
        ("accept-encoding", "gzip, deflate", false),
        ("x-long", &"v".repeat(300), false),
        ("", "", false),
    ];
    let mut block = Vec::new();
    for (n, v, s) in list {
        encode_field(&mut block, n.as_bytes(), v.as_bytes(), *s);
    }
    let mut d = Decoder::new(4096, 1 << 16);
    let want: Vec<_> = list
        .iter()
        .map(|(n, v, s)| (n.to_string(), v.to_string(), *s))
        .collect();
    assert_eq!(fields(&mut d, &block), Ok(want));
    assert_eq!(d.table_len(), 0);
    // Whole static entries go as one byte.
    let mut one = Vec::new();
    encode_field(&mut one, b":method", b"POST", false);
    assert_eq!(one, [0x83]);
}

#[test]
fn table_size_updates_are_bounded_and_come_first() {
    let mut d = Decoder::new(256, 1 << 16);
    // Fill the table, then shrink it to 0 (evicts everything) and back.
    fields(
        &mut d,
        &hex("400a 6375 7374 6f6d 2d6b 6579 0d63 7573 746f 6d2d 6865 6164 6572"),
    )
    .unwrap();
    assert_eq!(d.table_len(), 1);
    let mut block = Vec::new();
    encode_table_size(&mut block, 0);
    encode_table_size(&mut block, 256);
    block.push(0x82);
    assert_eq!(fields(&mut d, &block), Ok(plain(&[(":method", "GET")])));
    assert_eq!(d.table_len(), 0);
    // Over the limit we announced.
    let mut block = Vec::new();
    encode_table_size(&mut block, 257);
    assert_eq!(
        fields(&mut d, &block),
        Err(HpackError::TableSizeOverLimit {
            size: 257,
            limit: 256
        })
    );
    // After a field.
    let mut block = vec![0x82];
    encode_table_size(&mut block, 0);
    assert_eq!(fields(&mut d, &block), Err(HpackError::LateTableSizeUpdate));
}

#[test]
fn bad_indexes_and_truncations_are_errors() {
    let mut d = Decoder::new(4096, 1 << 16);
    assert_eq!(fields(&mut d, &[0x80]), Err(HpackError::BadIndex(0)));
    assert_eq!(fields(&mut d, &[0xbe]), Err(HpackError::BadIndex(62)));
    assert_eq!(
        fields(&mut d, &[0x7e, 0x01, b'x']),
        Err(HpackError::BadIndex(62))
    );
    // A literal whose value runs past the block.
    assert_eq!(
        fields(&mut d, &[0x04, 0x05, b'/']),
        Err(HpackError::Truncated)
    );
    assert_eq!(fields(&mut d, &[0x40]), Err(HpackError::Truncated));
}

#[test]
fn a_header_list_over_the_limit_is_refused_after_the_table_is_kept_in_step() {
    let mut d = Decoder::new(4096, 100);
    let mut block = Vec::new();
    // Indexed (with incremental indexing): 40 + value.
    block.push(0x40);
    put_integer(&mut block, 0, 7, 6);
    block.extend_from_slice(b"x-big1");
    put_integer(&mut block, 0, 7, 80);
    block.extend_from_slice(&[b'v'; 80]);
    let mut seen = 0;
    let r = d.decode(&block, |_| seen += 1);
    assert_eq!(r, Err(HpackError::ListTooLarge { limit: 100 }));
    assert_eq!(seen, 0);
    // The entry was added all the same: the next block may refer to it.
    assert_eq!(d.table_len(), 1);
    let mut d2 = Decoder::new(4096, 1000);
    d2.decode(&block, |_| {}).unwrap();
    assert_eq!(fields(&mut d2, &[0xbe]).unwrap()[0].0, "x-big1".to_string());
}

#[test]
fn no_input_panics() {
    // A cheap xorshift: every byte pattern in short blocks, and mutations of a real one.
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let real = hex("8287 85bf 4088 25a8 49e9 5ba9 7d7f 8925 a849 e95b b8e8 b4bf");
    for _ in 0..200_000 {
        let mut d = Decoder::new(256, 4096);
        let len = (next() % 24) as usize;
        let block: Vec<u8> = if next() % 2 == 0 {
            (0..len).map(|_| next() as u8).collect()
        } else {
            let mut b = real.clone();
            let i = (next() as usize) % b.len();
            b[i] ^= next() as u8;
            b.truncate(b.len() - (next() as usize % 3));
            b
        };
        let _ = d.decode(&block, |_| {});
        let _ = d.decode(&block, |_| {});
        assert!(d.table_size() <= 256);
    }
}

#[test]
fn fields_that_are_not_valid_http2_text_are_marked_but_still_decoded() {
    let valid = |block: &[u8], d: &mut Decoder| {
        let mut out = Vec::new();
        d.decode(block, |f| out.push(f.valid)).unwrap();
        out
    };
    let mut d = Decoder::new(4096, 16 << 10);
    // Literals without indexing, new names: `x-ok: v`, `X-Up: v`, `x-crlf: a\r\nb`, `x-sp:  v`.
    let mut block = Vec::new();
    for (name, value) in [
        ("x-ok", "v"),
        ("X-Up", "v"),
        ("x-crlf", "a\r\nb"),
        ("x-sp", " v"),
        ("x:colon", "v"),
    ] {
        block.push(0x00);
        block.push(name.len() as u8);
        block.extend_from_slice(name.as_bytes());
        block.push(value.len() as u8);
        block.extend_from_slice(value.as_bytes());
    }
    assert_eq!(valid(&block, &mut d), [true, false, false, false, false]);
    // Added to the dynamic table with a NUL in the value, then referenced by index: still
    // marked; its name alone (with a new value) is fine.
    let mut add = vec![0x40, 4];
    add.extend_from_slice(b"x-nu");
    add.extend_from_slice(&[3, b'a', 0, b'b']);
    assert_eq!(valid(&add, &mut d), [false]);
    assert_eq!(valid(&[0xbe], &mut d), [false]);
    assert_eq!(valid(&[0x0f, 0x2f, 1, b'v'], &mut d), [true]);
    // The static table's fields are valid.
    assert_eq!(valid(&[0x82, 0x84], &mut d), [true, true]);
}
