// Shared by every target: decode all frames of `data` with `decoder`, then put each through every
// accessor, rewrite and reply encoder. Anything may fail; nothing may panic.
// (No `forbid(unsafe_code)` here: libfuzzer-sys's entry point macro needs `#[no_mangle]`.)

use bytes::BytesMut;
use fnmesh_codec::{encode_exception, int_key, ExceptionType, FrameDecoder, Protocol, ReplyTarget};

#[allow(dead_code)]
pub fn exercise(mut decoder: FrameDecoder, data: &[u8], chunk: usize) {
    let mut buf = BytesMut::new();
    let chunk = chunk.max(1);
    for piece in data.chunks(chunk) {
        buf.extend_from_slice(piece);
        loop {
            match decoder.decode(&mut buf) {
                Ok(Some(mut f)) => {
                    assert!(!f.is_empty());
                    let _ = f.name();
                    if let Some(h) = f.ttheader().copied() {
                        let head = f.head();
                        let _ = (h.str_kvs(head).count(), h.int_kvs(head).count());
                        let _ = (
                            h.rpc_timeout_ms(head),
                            h.idl_service(head),
                            h.acl_token(head),
                        );
                    }
                    let _ = encode_exception(
                        &ReplyTarget::of(&f),
                        ExceptionType::InternalError,
                        "fuzz",
                        Some("bad-request"),
                    );
                    let before = f.payload().to_vec();
                    let _ = f.set_seqid(0x7fff_ffff);
                    let _ = f.set_int_key(int_key::RPC_TIMEOUT, b"4294967295");
                    let _ = f.strip_service_prefix();
                    assert_eq!(f.payload(), &before[..], "rewrites never touch the payload");
                }
                Ok(None) => break,
                Err(_) => return,
            }
        }
    }
}

/// Splits off the input's first byte, which picks the protocol (its low bit) and, for the targets
/// that use it, a chunk size (the other bits).
#[allow(dead_code)]
pub fn split_protocol(data: &[u8]) -> Option<(Protocol, u8, &[u8])> {
    let (&pick, rest) = data.split_first()?;
    let protocol = if pick & 1 == 0 {
        Protocol::Binary
    } else {
        Protocol::Compact
    };
    Some((protocol, pick >> 1, rest))
}
