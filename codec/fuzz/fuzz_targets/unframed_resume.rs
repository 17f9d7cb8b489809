#![no_main]
//! The unframed decoder walked in chunks (keeping its place between them, issue 17) against the
//! same bytes decoded at once: both find the same end, or both fail, or both wait.
use bytes::BytesMut;
use fnmesh_codec::{Detected, FrameDecoder, Limits, MessageHeader, MessageType};
use libfuzzer_sys::fuzz_target;

#[path = "common.rs"]
mod common;

fn decoder(protocol: fnmesh_codec::Protocol) -> FrameDecoder {
    let limits = Limits {
        max_frame_size: 1 << 20,
        max_depth: 16,
        ..Limits::default()
    };
    FrameDecoder::for_transport(Detected::Unframed(protocol), limits)
}

fuzz_target!(|data: &[u8]| {
    let Some((protocol, chunk, body)) = common::split_protocol(data) else {
        return;
    };
    let mut whole = BytesMut::new();
    MessageHeader::encode(&mut whole, protocol, true, MessageType::Call, "m", 1);
    whole.extend_from_slice(body);
    let bytes = whole.clone();
    let at_once = decoder(protocol).decode(&mut whole).map(|f| f.map(|f| f.len()));
    let mut d = decoder(protocol);
    let mut buf = BytesMut::new();
    let mut chunked = Ok(None);
    for piece in bytes.chunks(usize::from(chunk).max(1)) {
        buf.extend_from_slice(piece);
        chunked = d.decode(&mut buf).map(|f| f.map(|f| f.len()));
        if !matches!(chunked, Ok(None)) {
            break;
        }
    }
    match (&at_once, &chunked) {
        (Ok(a), Ok(b)) => assert_eq!(a, b),
        (Err(_), Err(_)) => {}
        _ => panic!("at once {at_once:?}, in chunks {chunked:?}"),
    }
});
