//! Bad input: truncations, lengths over every limit, lying header sizes, unknown info ids,
//! invalid UTF-8, deep nesting and 100,000 random mutations of real frames. Every case must end in
//! an error or "need more bytes"; none may panic or loop.

mod common;

use bytes::{BufMut, BytesMut};
use common::*;
use fnmesh_codec::{
    encode_exception, int_key, CodecError, ExceptionType, Frame, FrameDecoder, Limits, MessageType,
    Protocol, ReplyTarget, TTHeaderBuilder, Transport,
};

/// Frames captured from real Volo 0.12 clients (see `tests/tests/volo_codec_interop.rs`).
const VOLO_TTHEADER: &[u8] = include_bytes!("fixtures/volo_ttheader_framed.bin");
const VOLO_FRAMED: &[u8] = include_bytes!("fixtures/volo_framed.bin");
const VOLO_BUFFERED: &[u8] = include_bytes!("fixtures/volo_buffered.bin");

fn real_frames() -> Vec<(&'static str, Vec<u8>)> {
    let mut v = vec![
        ("captured volo ttheader+framed", VOLO_TTHEADER.to_vec()),
        ("captured volo framed", VOLO_FRAMED.to_vec()),
        ("captured volo buffered", VOLO_BUFFERED.to_vec()),
    ];
    v.extend(sample_frames());
    v
}

/// Decodes `bytes`, expecting an error that matches `pattern`.
macro_rules! assert_decode_err {
    ($bytes:expr, $limits:expr, $pattern:pat) => {{
        let err = decode_err($bytes, $limits);
        assert!(matches!(err, $pattern), "{err}");
    }};
}

/// Runs `step` (decode or split) until the decoder wants more or fails; returns the frames and
/// the error, if any.
fn drain_with<T>(
    bytes: &[u8],
    limits: Limits,
    mut step: impl FnMut(&mut FrameDecoder, &mut BytesMut) -> Result<Option<T>, CodecError>,
    len: impl Fn(&T) -> usize,
) -> (Vec<T>, Option<CodecError>) {
    let mut d = FrameDecoder::new(limits);
    let mut buf = BytesMut::from(bytes);
    let mut frames = Vec::new();
    loop {
        match step(&mut d, &mut buf) {
            Ok(Some(f)) => {
                assert!(len(&f) > 0, "a frame always consumes bytes");
                frames.push(f);
            }
            Ok(None) => return (frames, None),
            Err(e) => return (frames, Some(e)),
        }
    }
}

/// Decodes until the decoder wants more or fails.
fn drain(bytes: &[u8], limits: Limits) -> (Vec<Frame>, Option<CodecError>) {
    drain_with(bytes, limits, FrameDecoder::decode, Frame::len)
}

/// The same with [`FrameDecoder::split`]: the raw frames.
fn drain_split(bytes: &[u8], limits: Limits) -> (Vec<BytesMut>, Option<CodecError>) {
    drain_with(bytes, limits, FrameDecoder::split, BytesMut::len)
}

fn decode_err(bytes: &[u8], limits: Limits) -> CodecError {
    let (frames, err) = drain(bytes, limits);
    assert!(frames.is_empty(), "no frame from bad input");
    err.expect("an error, not a wait for more bytes")
}

/// Every strict prefix of `bytes` gives no frame and no error: the decoder waits for more.
fn assert_every_prefix_waits<T>(
    label: &str,
    bytes: &[u8],
    drain: impl Fn(&[u8]) -> (Vec<T>, Option<CodecError>),
) {
    for n in 0..bytes.len() {
        let (frames, err) = drain(&bytes[..n]);
        assert!(
            frames.is_empty() && err.is_none(),
            "{label}: prefix of {n} bytes"
        );
    }
}

#[test]
fn every_truncation_of_a_real_frame_waits_for_more_bytes() {
    for (label, bytes) in real_frames() {
        assert_every_prefix_waits(label, &bytes, |b| drain(b, Limits::default()));
        let (frames, err) = drain(&bytes, Limits::default());
        assert_eq!((frames.len(), err), (1, None), "{label}: whole frame");
    }
}

#[test]
fn split_takes_exactly_the_frames_decode_does_and_waits_on_every_truncation() {
    for (label, bytes) in real_frames() {
        assert_every_prefix_waits(label, &bytes, |b| drain_split(b, Limits::default()));
        // Three frames back to back, then half of a fourth: three splits, each exactly the
        // bytes `decode` takes, and the half frame left waiting.
        let mut wire = bytes.repeat(3);
        wire.extend_from_slice(&bytes[..bytes.len() / 2]);
        let (split, err) = drain_split(&wire, Limits::default());
        let (decoded, _) = drain(&wire, Limits::default());
        assert_eq!((split.len(), err), (3, None), "{label}");
        for (s, d) in split.iter().zip(&decoded) {
            assert_eq!(&s[..], &d.to_vec()[..], "{label}");
        }
        // Over the size limit: refused, as by decode.
        let limits = Limits {
            max_frame_size: bytes.len() - 1,
            ..Limits::default()
        };
        let (frames, err) = drain_split(&bytes, limits);
        assert!(frames.is_empty(), "{label}");
        assert!(err.is_some_and(|e| e.is_too_large()), "{label}");
    }
    // A declared length over the limit is refused from the first six bytes.
    let (_, err) = drain_split(&[0xff, 0xff, 0xff, 0xff, 0x10, 0x00], Limits::default());
    assert!(err.is_some_and(|e| e.is_too_large()));
    // Neither magic nor protocol marker: malformed, not a frame.
    let (_, err) = drain_split(
        &[0, 0, 0, 8, 0x10, 0x01, 0, 0, 0, 0, 0, 0],
        Limits::default(),
    );
    assert!(err.is_some());
}

#[test]
fn frames_over_max_frame_size_are_refused_before_they_arrive() {
    let limits = Limits {
        max_frame_size: 16,
        ..Limits::default()
    };
    // Declared lengths: only the first 6 bytes are present.
    for prefix in [&VOLO_TTHEADER[..6], &VOLO_FRAMED[..6]] {
        assert!(decode_err(prefix, limits).is_too_large());
    }
    assert!(decode_err(&[0xff, 0xff, 0xff, 0xff, 0x10, 0x00], Limits::default()).is_too_large());
    // Unframed: a string whose declared length passes the limit, long before its bytes arrive.
    let mut b = BytesMut::new();
    MessageHeaderBytes::binary(&mut b, "Echo");
    b.put_slice(&[0x0b, 0, 1, 0x7f, 0xff, 0xff, 0xff]);
    assert!(decode_err(&b, Limits::default()).is_too_large());
    // Unframed compact: the same with a varint length.
    let mut c = BytesMut::new();
    c.put_slice(&[0x82, 0x21, 0x01, 0x04]);
    c.put_slice(b"Echo");
    c.put_slice(&[0x18, 0xff, 0xff, 0xff, 0xff, 0x07]);
    assert!(decode_err(&c, Limits::default()).is_too_large());
    // A whole real frame just over a limit set to its size minus one.
    for (label, bytes) in real_frames() {
        let limits = Limits {
            max_frame_size: bytes.len() - 1,
            ..Limits::default()
        };
        let err = decode_err(&bytes, limits);
        assert!(err.is_too_large(), "{label}: {err}");
    }
}

struct MessageHeaderBytes;

impl MessageHeaderBytes {
    fn binary(b: &mut BytesMut, name: &str) {
        fnmesh_codec::MessageHeader::encode(b, Protocol::Binary, true, MessageType::Call, name, 1);
    }
}

#[test]
fn header_limits_names_and_nesting_are_enforced() {
    let mut bytes = VOLO_TTHEADER.to_vec();
    // Header size larger than the frame.
    bytes[12..14].copy_from_slice(&0x4000u16.to_be_bytes());
    assert_decode_err!(
        &bytes,
        Limits::default(),
        CodecError::Malformed {
            what: "ttheader",
            ..
        }
    );
    // Header size over max_header_size.
    let limits = Limits {
        max_header_size: 64,
        ..Limits::default()
    };
    assert_decode_err!(
        VOLO_TTHEADER,
        limits,
        CodecError::LimitExceeded {
            what: "ttheader header size",
            ..
        }
    );
    // Name over max_name_len, in every protocol.
    let limits = Limits {
        max_name_len: 3,
        ..Limits::default()
    };
    for (label, bytes) in real_frames() {
        let err = decode_err(&bytes, limits);
        assert!(
            matches!(
                err,
                CodecError::LimitExceeded {
                    what: "message name length",
                    ..
                }
            ),
            "{label}: {err}"
        );
    }
    // Nesting past max_depth, binary and compact, unframed (walked) and framed (not walked).
    let limits = Limits {
        max_depth: 8,
        ..Limits::default()
    };
    for protocol in [Protocol::Binary, Protocol::Compact] {
        let mut body = Vec::new();
        for _ in 0..20 {
            match protocol {
                Protocol::Binary => body.extend_from_slice(&[0x0c, 0, 1]),
                Protocol::Compact => body.push(0x1c),
            }
        }
        body.extend(std::iter::repeat_n(0u8, 21));
        let bytes = frame(
            Transport::Unframed,
            protocol,
            true,
            MessageType::Call,
            "Deep",
            1,
            None,
            &body,
        );
        assert_decode_err!(
            &bytes,
            limits,
            CodecError::LimitExceeded {
                what: "nesting depth",
                ..
            }
        );
        // Nested lists count too.
        let mut lists = Vec::new();
        match protocol {
            Protocol::Binary => {
                lists.extend_from_slice(&[0x0f, 0, 1]);
                for _ in 0..20 {
                    lists.extend_from_slice(&[0x0f, 0, 0, 0, 1]);
                }
            }
            // A list field, then list<list<...>> headers of one element each.
            Protocol::Compact => lists.extend(std::iter::repeat_n(0x19, 21)),
        }
        let bytes = frame(
            Transport::Unframed,
            protocol,
            true,
            MessageType::Call,
            "Deep",
            1,
            None,
            &lists,
        );
        assert_decode_err!(
            &bytes,
            limits,
            CodecError::LimitExceeded {
                what: "nesting depth",
                ..
            }
        );
    }
}

#[test]
fn unknown_info_ids_bad_lengths_and_bad_names_are_malformed() {
    // An unknown info id where the padding byte was.
    let mut bytes = VOLO_TTHEADER.to_vec();
    let pad = 14 + 0x25 * 4 - 1;
    assert_eq!(bytes[pad], 0);
    bytes[pad] = 0x42;
    assert_decode_err!(
        &bytes,
        Limits::default(),
        CodecError::Malformed {
            reason: "unknown info id",
            ..
        }
    );
    // A string value whose length runs past the header.
    let mut bytes = VOLO_TTHEADER.to_vec();
    bytes[0x29..0x2b].copy_from_slice(&0xfff0u16.to_be_bytes());
    assert_decode_err!(
        &bytes,
        Limits::default(),
        CodecError::Malformed {
            what: "ttheader",
            ..
        }
    );
    // An unsupported protocol id, and payload transforms.
    let mut bytes = VOLO_TTHEADER.to_vec();
    bytes[14] = 4;
    assert!(matches!(
        decode_err(&bytes, Limits::default()),
        CodecError::Malformed { .. }
    ));
    let tt = TTHeaderBuilder {
        transforms: &[1],
        ..Default::default()
    };
    let bytes = frame(
        Transport::TTHeader,
        Protocol::Binary,
        true,
        MessageType::Call,
        "Echo",
        1,
        Some(&tt),
        &echo_args(Protocol::Binary, b"x"),
    );
    assert!(matches!(
        decode_err(&bytes, Limits::default()),
        CodecError::Malformed { .. }
    ));
    // Invalid UTF-8 in the name, each protocol.
    for (label, mut bytes) in real_frames() {
        let at = bytes.windows(4).rposition(|w| w == b"Echo").unwrap();
        bytes[at + 1] = 0xc3;
        bytes[at + 2] = 0x28;
        let err = decode_err(&bytes, Limits::default());
        assert!(
            matches!(
                err,
                CodecError::Malformed {
                    reason: "not valid UTF-8",
                    ..
                } | CodecError::UnknownProtocol(_)
            ),
            "{label}: {err}"
        );
    }
    // An unknown message type, a bad version, a frame that is not Thrift at all.
    let mut bytes = VOLO_FRAMED.to_vec();
    bytes[7] = 9;
    assert!(matches!(
        decode_err(&bytes, Limits::default()),
        CodecError::Malformed { .. }
    ));
    let mut bytes = VOLO_BUFFERED.to_vec();
    bytes[1] = 0x02;
    assert!(matches!(
        decode_err(&bytes, Limits::default()),
        CodecError::UnknownProtocol(_)
    ));
    assert!(matches!(
        decode_err(b"GET / HTTP/1.1\r\n\r\n", Limits::default()),
        CodecError::UnknownProtocol(_)
    ));
    // A framed length shorter than the message header inside it.
    let mut bytes = VOLO_FRAMED.to_vec();
    bytes[0..4].copy_from_slice(&6u32.to_be_bytes());
    assert_decode_err!(
        &bytes,
        Limits::default(),
        CodecError::Malformed {
            reason: "runs past the end of the frame",
            ..
        }
    );
    // A negative container size, binary.
    let bytes = frame(
        Transport::Unframed,
        Protocol::Binary,
        true,
        MessageType::Call,
        "Echo",
        1,
        None,
        &[0x0f, 0, 1, 8, 0xff, 0xff, 0xff, 0xff],
    );
    assert!(matches!(
        decode_err(&bytes, Limits::default()),
        CodecError::Malformed { .. }
    ));
}

/// xorshift64*: deterministic, so a failure reproduces from its iteration number.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

fn mutate(rng: &mut Rng, input: &[u8]) -> Vec<u8> {
    let mut v = input.to_vec();
    for _ in 0..1 + rng.below(4) {
        let at = rng.below(v.len());
        match rng.below(7) {
            0 => v[at] ^= 1 << rng.below(8),
            1 => v[at] = rng.next() as u8,
            2 => v[at] = [0x00, 0x7f, 0x80, 0xff][rng.below(4)],
            3 => v.truncate(at),
            4 => v.insert(at, rng.next() as u8),
            5 => {
                if at < v.len() {
                    v.remove(at);
                }
            }
            _ => {
                // Overwrite a would-be length with an extreme value.
                let extreme = [0u32, 1, 0x7fff_ffff, 0xffff_ffff, 0x0001_0000][rng.below(5)];
                for (i, b) in extreme.to_be_bytes().iter().enumerate() {
                    if let Some(slot) = v.get_mut(at + i) {
                        *slot = *b;
                    }
                }
            }
        }
        if v.is_empty() {
            break;
        }
    }
    v
}

#[test]
fn a_hundred_thousand_mutations_of_real_frames_never_panic() {
    let frames = real_frames();
    let mut rng = Rng(0x5eed_f00d_cafe_d00d);
    let (mut decoded, mut errors, mut waiting) = (0u32, 0u32, 0u32);
    for i in 0..100_000 {
        let (_, original) = &frames[i % frames.len()];
        let bytes = mutate(&mut rng, original);
        // Split never panics either, and never takes a frame longer than its input.
        let (split, _) = drain_split(&bytes, Limits::default());
        assert!(split.iter().map(|f| f.len()).sum::<usize>() <= bytes.len());
        let (frames_out, err) = drain(&bytes, Limits::default());
        match (&frames_out[..], err) {
            (_, Some(_)) => errors += 1,
            ([], None) => waiting += 1,
            (_, None) => decoded += 1,
        }
        // Whatever decoded must survive every rewrite and reply without panicking.
        for mut f in frames_out {
            let _ = f.ttheader().map(|h| {
                (
                    h.str_kvs(f.head()).count(),
                    h.int_kvs(f.head()).count(),
                    h.rpc_timeout_ms(f.head()),
                )
            });
            let _ = encode_exception(
                &ReplyTarget::of(&f),
                ExceptionType::InternalError,
                "x",
                Some("bad-request"),
            );
            let _ = fnmesh_codec::exception_type(f.payload(), f.protocol(), &Limits::default());
            let _ = f.set_seqid(rng.next() as i32);
            let _ = f.set_int_key(int_key::RPC_TIMEOUT, b"123456");
            let _ = f.strip_service_prefix();
            assert_eq!(f.head().len() + f.payload().len(), f.len());
        }
    }
    // The mutations exercise all three outcomes, so the loop is not vacuous.
    assert!(
        decoded > 1000 && errors > 1000 && waiting > 1000,
        "{decoded} {errors} {waiting}"
    );
}
