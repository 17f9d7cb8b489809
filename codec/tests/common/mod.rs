//! Frames for the codec's tests: the request docs/design.md documents (captured from a Volo 0.12 client)
//! and builders for every transport and protocol.
#![allow(dead_code)]

use bytes::{BufMut, BytesMut};
use fnmesh_codec::{MessageHeader, MessageType, Protocol, TTHeaderBuilder, Transport};

/// `Echo("hi")` from a Volo 0.12 client, TTHeader + Framed + Binary, as docs/design.md shows it.
pub fn volo_echo_request() -> Vec<u8> {
    let mut b = BytesMut::new();
    b.put_slice(&[0, 0, 0, 0x88, 0x10, 0x00, 0, 0, 0, 0, 0, 0, 0x00, 0x17]);
    b.put_slice(&[0, 0]);
    b.put_slice(&[0x01, 0, 1]);
    kv(&mut b, b"isn", b"EchoService");
    b.put_slice(&[0x10, 0, 6]);
    for (k, v) in [
        (16u16, &b"1"[..]),
        (12, b"500"),
        (3, b"caller-svc"),
        (9, b"Echo"),
        (6, b"echo-svc"),
        (11, b"127.0.0.1:18083"),
    ] {
        b.put_u16(k);
        b.put_u16(v.len() as u16);
        b.put_slice(v);
    }
    b.put_u8(0);
    b.put_u32(0x1e);
    b.put_slice(&[0x80, 0x01, 0x00, 0x01, 0, 0, 0, 4]);
    b.put_slice(b"Echo");
    b.put_slice(&[
        0, 0, 0, 0, 0x0c, 0, 1, 0x0b, 0, 1, 0, 0, 0, 2, b'h', b'i', 0, 0,
    ]);
    assert_eq!(b.len(), 140);
    b.to_vec()
}

fn kv(b: &mut BytesMut, k: &[u8], v: &[u8]) {
    b.put_u16(k.len() as u16);
    b.put_slice(k);
    b.put_u16(v.len() as u16);
    b.put_slice(v);
}

/// The argument struct of `Echo(EchoRequest { message })` in `protocol`.
pub fn echo_args(protocol: Protocol, message: &[u8]) -> Vec<u8> {
    let mut b = BytesMut::new();
    match protocol {
        Protocol::Binary => {
            b.put_slice(&[0x0c, 0, 1, 0x0b, 0, 1]);
            b.put_u32(message.len() as u32);
            b.put_slice(message);
            b.put_slice(&[0, 0]);
        }
        Protocol::Compact => {
            b.put_slice(&[0x1c, 0x18]);
            put_varint(&mut b, message.len() as u64);
            b.put_slice(message);
            b.put_slice(&[0, 0]);
        }
    }
    b.to_vec()
}

pub fn put_varint(b: &mut BytesMut, mut v: u64) {
    while v >= 0x80 {
        b.put_u8(v as u8 | 0x80);
        v >>= 7;
    }
    b.put_u8(v as u8);
}

/// A whole frame: `transport` around a message header and `body` (an encoded struct).
#[allow(clippy::too_many_arguments)]
pub fn frame(
    transport: Transport,
    protocol: Protocol,
    strict: bool,
    kind: MessageType,
    name: &str,
    seqid: i32,
    tt: Option<&TTHeaderBuilder<'_>>,
    body: &[u8],
) -> Vec<u8> {
    let mut message = BytesMut::new();
    MessageHeader::encode(&mut message, protocol, strict, kind, name, seqid);
    message.put_slice(body);
    let mut out = BytesMut::new();
    match transport {
        Transport::TTHeader => {
            let default = TTHeaderBuilder {
                seqid: seqid as u32,
                protocol: Some(protocol),
                inner_framed: true,
                ..Default::default()
            };
            let mut b = tt.cloned().unwrap_or(default);
            b.protocol = Some(protocol);
            b.encode(&mut out, message.len()).unwrap();
        }
        Transport::Framed => out.put_u32(message.len() as u32),
        Transport::Unframed => {}
    }
    out.put_slice(&message);
    out.to_vec()
}

/// One representative frame of each transport and protocol, for table-driven tests.
pub fn sample_frames() -> Vec<(&'static str, Vec<u8>)> {
    let mut out = vec![("volo ttheader+framed binary", volo_echo_request())];
    for (label, transport, protocol, strict) in [
        (
            "ttheader compact",
            Transport::TTHeader,
            Protocol::Compact,
            true,
        ),
        ("framed binary", Transport::Framed, Protocol::Binary, true),
        ("framed compact", Transport::Framed, Protocol::Compact, true),
        (
            "unframed binary",
            Transport::Unframed,
            Protocol::Binary,
            true,
        ),
        (
            "unframed binary non-strict",
            Transport::Unframed,
            Protocol::Binary,
            false,
        ),
        (
            "unframed compact",
            Transport::Unframed,
            Protocol::Compact,
            true,
        ),
    ] {
        let body = echo_args(protocol, b"hello, fnmesh");
        let f = frame(
            transport,
            protocol,
            strict,
            MessageType::Call,
            "Echo",
            7,
            None,
            &body,
        );
        out.push((label, f));
    }
    out
}
