//! Decoding real and built frames: every field the proxy reads, for every transport.

mod common;

use bytes::BytesMut;
use common::*;
use fnmesh_codec::{
    detect, int_key, Detected, Detection, FrameDecoder, Limits, MessageType, Protocol,
    TTHeaderBuilder, Transport,
};

fn decode_one(bytes: &[u8]) -> fnmesh_codec::Frame {
    let mut buf = BytesMut::from(bytes);
    let frame = FrameDecoder::new(Limits::default())
        .decode(&mut buf)
        .expect("valid frame")
        .expect("whole frame");
    assert!(buf.is_empty(), "the decoder took exactly one frame");
    frame
}

#[test]
fn volo_request_from_design_md_has_every_field() {
    let bytes = volo_echo_request();
    assert_eq!(detect(&bytes), Detection::Found(Detected::TTHeader));
    let f = decode_one(&bytes);
    assert_eq!(f.transport(), Transport::TTHeader);
    assert_eq!(f.protocol(), Protocol::Binary);
    assert_eq!(f.name(), "Echo");
    assert_eq!(f.kind(), MessageType::Call);
    assert_eq!(f.seqid(), 0);
    assert_eq!(f.to_vec(), bytes, "head + payload reproduce the frame");
    let h = f.ttheader().unwrap();
    let head = f.head();
    assert_eq!(h.flags, 0);
    assert_eq!(h.seqid, 0);
    assert!(h.inner_framed);
    assert_eq!(h.header_end, 14 + 23 * 4);
    assert_eq!(h.idl_service(head), Some(&b"EchoService"[..]));
    assert_eq!(h.to_service(head), Some(&b"echo-svc"[..]));
    assert_eq!(h.to_method(head), Some(&b"Echo"[..]));
    assert_eq!(h.from_service(head), Some(&b"caller-svc"[..]));
    assert_eq!(h.rpc_timeout_ms(head), Some(500));
    assert_eq!(h.int_value(head, 11), Some(&b"127.0.0.1:18083"[..]));
    assert_eq!(
        h.int_value(head, 16),
        Some(&b"1"[..]),
        "unknown int keys are kept"
    );
    let ints: Vec<u16> = h.int_kvs(head).map(|(k, _)| k).collect();
    assert_eq!(ints, [16, 12, 3, 9, 6, 11]);
    let strs: Vec<_> = h.str_kvs(head).collect();
    assert_eq!(strs, [(&b"isn"[..], &b"EchoService"[..])]);
    assert_eq!(h.acl_token(head), None);
    assert!(h.transforms(head).is_empty());
    // The payload is the argument struct, exactly as sent.
    assert_eq!(f.payload(), &bytes[bytes.len() - 14..]);
}

#[test]
fn every_transport_and_protocol_decodes() {
    for (label, bytes) in sample_frames() {
        let f = decode_one(&bytes);
        assert_eq!(f.name(), "Echo", "{label}");
        assert_eq!(f.kind(), MessageType::Call, "{label}");
        assert_eq!(f.to_vec(), bytes, "{label}");
        let expected = if label.starts_with("volo") { 0 } else { 7 };
        assert_eq!(f.seqid(), expected, "{label}");
        assert_eq!(
            f.protocol() == Protocol::Compact,
            label.contains("compact"),
            "{label}"
        );
    }
}

#[test]
fn acl_token_transforms_and_unknown_string_keys_are_exposed() {
    let tt = TTHeaderBuilder {
        seqid: 9,
        str_kvs: vec![(b"isn", b"EchoService"), (b"x-unknown", b"\xff\x00raw")],
        int_kvs: vec![(int_key::RPC_TIMEOUT, b"1500"), (999, b"opaque")],
        acl_token: Some(b"secret-token"),
        inner_framed: false,
        ..Default::default()
    };
    let body = echo_args(Protocol::Binary, b"x");
    let bytes = frame(
        Transport::TTHeader,
        Protocol::Binary,
        true,
        MessageType::Call,
        "Echo",
        9,
        Some(&tt),
        &body,
    );
    let f = decode_one(&bytes);
    let h = f.ttheader().unwrap();
    assert!(!h.inner_framed);
    assert_eq!(h.seqid, 9);
    assert_eq!(h.acl_token(f.head()), Some(&b"secret-token"[..]));
    assert_eq!(
        h.str_value(f.head(), b"x-unknown"),
        Some(&b"\xff\x00raw"[..])
    );
    assert_eq!(h.rpc_timeout_ms(f.head()), Some(1500));
    assert_eq!(h.int_value(f.head(), 999), Some(&b"opaque"[..]));
}

#[test]
fn a_stream_of_frames_arriving_byte_by_byte_decodes_in_order() {
    for (label, bytes) in sample_frames() {
        let mut wire = Vec::new();
        for _ in 0..3 {
            wire.extend_from_slice(&bytes);
        }
        let mut decoder = FrameDecoder::new(Limits::default());
        let mut buf = BytesMut::new();
        let mut frames = Vec::new();
        for &b in &wire {
            buf.extend_from_slice(&[b]);
            while let Some(f) = decoder.decode(&mut buf).expect(label) {
                frames.push(f);
            }
        }
        assert_eq!(frames.len(), 3, "{label}");
        for f in &frames {
            assert_eq!(f.to_vec(), bytes, "{label}");
        }
        assert!(buf.is_empty());
    }
}

#[test]
fn unframed_walk_covers_every_type_in_both_protocols() {
    // Binary: bool, byte, double, i16, i32, i64, string, struct, map<i32,string>, set<i64>,
    // list<struct>, uuid.
    let mut b = Vec::new();
    b.extend_from_slice(&[2, 0, 1, 1, 3, 0, 2, 7, 4, 0, 3]);
    b.extend_from_slice(&[0; 8]);
    b.extend_from_slice(&[6, 0, 4, 0, 1, 8, 0, 5, 0, 0, 0, 1, 10, 0, 6]);
    b.extend_from_slice(&[0; 8]);
    b.extend_from_slice(&[
        11, 0, 7, 0, 0, 0, 2, b'o', b'k', 12, 0, 8, 8, 0, 1, 0, 0, 0, 1, 0,
    ]);
    b.extend_from_slice(&[13, 0, 9, 8, 11, 0, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0, 1, b'v']);
    b.extend_from_slice(&[14, 0, 10, 10, 0, 0, 0, 2]);
    b.extend_from_slice(&[0; 16]);
    b.extend_from_slice(&[15, 0, 11, 12, 0, 0, 0, 2, 0, 16, 0, 12]);
    b.extend_from_slice(&[0; 16]);
    b.push(0); // end of the second list element
    b.push(0); // end of the arguments
    let bytes = frame(
        Transport::Unframed,
        Protocol::Binary,
        true,
        MessageType::Call,
        "All",
        1,
        None,
        &b,
    );
    assert_eq!(decode_one(&bytes).payload(), &b[..]);

    // Compact: true, false, byte, i16, i32, i64, double, binary, list<bool>, set<string>
    // (long form size), map<i32,i64>, empty map, struct, uuid, field id in long form.
    let mut c = Vec::new();
    c.extend_from_slice(&[
        0x11, 0x12, 0x13, 7, 0x14, 0xfe, 0x03, 0x15, 0x80, 0x01, 0x16, 0x02,
    ]);
    c.push(0x17);
    c.extend_from_slice(&[0; 8]);
    c.extend_from_slice(&[0x18, 2, b'h', b'i', 0x19, 0x21, 1, 2, 0x1a, 0xf8, 16]);
    for _ in 0..16 {
        c.extend_from_slice(&[1, b'x']);
    }
    c.extend_from_slice(&[
        0x1b, 2, 0x56, 2, 4, 6, 8, 0x1b, 0, 0x1c, 0x15, 0x2a, 0, 0x1d,
    ]);
    c.extend_from_slice(&[0; 16]);
    c.extend_from_slice(&[0x05, 0xe8, 0x07, 0x02, 0]);
    let bytes = frame(
        Transport::Unframed,
        Protocol::Compact,
        true,
        MessageType::Call,
        "All",
        1,
        None,
        &c,
    );
    assert_eq!(decode_one(&bytes).payload(), &c[..]);
}

#[test]
fn for_transport_decoder_skips_detection() {
    let bytes = frame(
        Transport::Framed,
        Protocol::Compact,
        true,
        MessageType::Oneway,
        "Ping",
        3,
        None,
        &echo_args(Protocol::Compact, b"n"),
    );
    let mut d = FrameDecoder::for_transport(Detected::Framed(Protocol::Compact), Limits::default());
    let f = d.decode(&mut BytesMut::from(&bytes[..])).unwrap().unwrap();
    assert_eq!(
        (f.name(), f.kind(), f.seqid()),
        ("Ping", MessageType::Oneway, 3)
    );
}

/// `reply_kind` reads a reply's message type and the first field of its result struct, in
/// every transport and protocol: field 0 or an empty struct is a success, another field a
/// declared exception, an EXCEPTION message a TApplicationException.
#[test]
fn reply_kinds_are_read_from_the_first_result_field() {
    use fnmesh_codec::{reply_kind, ReplyKind};
    for transport in [Transport::TTHeader, Transport::Framed, Transport::Unframed] {
        for protocol in [Protocol::Binary, Protocol::Compact] {
            // Field 0 (a struct), in each protocol's form: Compact writes id 0 long-form.
            let success: &[u8] = match protocol {
                Protocol::Binary => &[0x0c, 0, 0, 0, 0],
                Protocol::Compact => &[0x0c, 0x00, 0, 0],
            };
            let declared = echo_args(protocol, b"boom");
            let cases: [(MessageType, &[u8], ReplyKind); 4] = [
                (MessageType::Reply, success, ReplyKind::Success),
                (MessageType::Reply, &[0], ReplyKind::Success),
                (MessageType::Reply, &declared, ReplyKind::Declared),
                (MessageType::Exception, &[0], ReplyKind::Exception),
            ];
            for (kind, body, want) in cases {
                let bytes = frame(transport, protocol, true, kind, "Echo", 7, None, body);
                assert_eq!(
                    reply_kind(&bytes),
                    Some(want),
                    "{transport:?} {protocol:?} {kind:?} {body:?}"
                );
            }
            // Cut anywhere inside the message header: unreadable, never a panic.
            let whole = frame(
                transport,
                protocol,
                true,
                MessageType::Reply,
                "Echo",
                7,
                None,
                &declared,
            );
            for n in 0..whole.len() {
                let _ = reply_kind(&whole[..n]);
            }
        }
    }
    let old = frame(
        Transport::Framed,
        Protocol::Binary,
        false,
        MessageType::Reply,
        "Echo",
        7,
        None,
        &[0],
    );
    assert_eq!(reply_kind(&old), None, "the old Binary form is not read");
}
