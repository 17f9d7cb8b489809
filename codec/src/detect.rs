//! Which protocol a connection speaks, from the first bytes it sent.

use crate::{message::Protocol, ttheader::TTHEADER_MAGIC};

/// The HTTP/2 client connection preface (RFC 9113 section 3.4).
pub const HTTP2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

const BINARY_VERSION_1: [u8; 2] = [0x80, 0x01];
const COMPACT_PROTOCOL_ID: u8 = 0x82;
const COMPACT_VERSION: u8 = 1;
/// Bytes needed to tell framed and TTHeader transports apart: length (4) + magic or version (2).
const FRAMED_PROBE: usize = 6;
/// Longest name accepted when recognising the old, non-strict unframed binary form by its shape.
const NON_STRICT_MAX_NAME: usize = 1024;

/// A transport recognised from a connection's first bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Detected {
    /// TTHeader (`u32 length`, then magic `0x1000`); its protocol is named inside the header.
    TTHeader,
    /// Framed Thrift: `u32 length`, then a Binary (`0x8001`) or Compact (`0x82`) message.
    Framed(Protocol),
    /// Unframed (buffered) Thrift: the message itself, strict or old non-strict Binary, or Compact.
    Unframed(Protocol),
    /// The HTTP/2 connection preface (gRPC over h2c).
    Http2,
    /// An HTTP/1.1 request line (`POST /...`): the JSON gateway.
    Http1,
}

/// The HTTP/1.1 methods a request may start with (each followed by a space).
const HTTP1_METHODS: [&[u8]; 7] = [
    b"GET ",
    b"POST ",
    b"PUT ",
    b"HEAD ",
    b"DELETE ",
    b"OPTIONS ",
    b"PATCH ",
];

/// An HTTP/1.1 request line's method: found, possible with more bytes, or not one.
fn detect_http1(prefix: &[u8]) -> Option<Detection> {
    let mut possible = false;
    for m in HTTP1_METHODS {
        let n = prefix.len().min(m.len());
        if prefix[..n] == m[..n] {
            if n == m.len() {
                return Some(Detection::Found(Detected::Http1));
            }
            possible = true;
        }
    }
    possible.then_some(Detection::NeedMore(1))
}

/// The answer of [`detect`] for a prefix of a stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Detection {
    Found(Detected),
    /// The prefix is consistent with a protocol, but at least this many more bytes are needed.
    NeedMore(usize),
    /// No protocol fnmesh speaks starts like this.
    Unknown,
}

/// Recognises the transport from the first bytes of a stream. Never reads past what it needs and
/// never panics: a short prefix yields [`Detection::NeedMore`] until it can decide.
pub fn detect(prefix: &[u8]) -> Detection {
    let Some(&first) = prefix.first() else {
        return Detection::NeedMore(1);
    };
    let http1 = detect_http1(prefix);
    if first == HTTP2_PREFACE[0] {
        // The HTTP/2 preface, POST, PUT and PATCH all start with "P".
        return match (detect_preface(prefix), http1) {
            (Detection::Found(d), _) | (_, Some(Detection::Found(d))) => Detection::Found(d),
            (_, Some(_)) => Detection::NeedMore(1),
            (preface, None) => preface,
        };
    }
    if let Some(http1) = http1 {
        return http1;
    }
    if first == BINARY_VERSION_1[0] {
        return match prefix.get(1) {
            None => Detection::NeedMore(1),
            Some(&0x01) => Detection::Found(Detected::Unframed(Protocol::Binary)),
            Some(_) => Detection::Unknown,
        };
    }
    if first == COMPACT_PROTOCOL_ID {
        return match prefix.get(1) {
            None => Detection::NeedMore(1),
            Some(b) if b & 0x1f == COMPACT_VERSION && (1..=4).contains(&(b >> 5)) => {
                Detection::Found(Detected::Unframed(Protocol::Compact))
            }
            Some(_) => Detection::Unknown,
        };
    }
    if prefix.len() < FRAMED_PROBE {
        // A length prefix, or a non-strict name length: both start with a big-endian u32 whose
        // top byte is small. Anything else is nothing we speak.
        return if first < 0x80 {
            Detection::NeedMore(FRAMED_PROBE - prefix.len())
        } else {
            Detection::Unknown
        };
    }
    let marker = [prefix[4], prefix[5]];
    if marker == TTHEADER_MAGIC.to_be_bytes() {
        return Detection::Found(Detected::TTHeader);
    }
    if marker == BINARY_VERSION_1 {
        return Detection::Found(Detected::Framed(Protocol::Binary));
    }
    if marker[0] == COMPACT_PROTOCOL_ID && marker[1] & 0x1f == COMPACT_VERSION {
        return Detection::Found(Detected::Framed(Protocol::Compact));
    }
    detect_non_strict(prefix)
}

fn detect_preface(prefix: &[u8]) -> Detection {
    let n = prefix.len().min(HTTP2_PREFACE.len());
    if prefix[..n] != HTTP2_PREFACE[..n] {
        return Detection::Unknown;
    }
    if n < HTTP2_PREFACE.len() {
        Detection::NeedMore(HTTP2_PREFACE.len() - n)
    } else {
        Detection::Found(Detected::Http2)
    }
}

/// The old non-strict binary form: `i32 name length`, the name, `i8 message type`, `i32 seqid`.
/// Only names that look like identifiers are taken, so that random bytes are not mistaken for it.
fn detect_non_strict(prefix: &[u8]) -> Detection {
    let len = u32::from_be_bytes([prefix[0], prefix[1], prefix[2], prefix[3]]) as usize;
    if len == 0 || len > NON_STRICT_MAX_NAME {
        return Detection::Unknown;
    }
    let name_end = 4 + len;
    let available = &prefix[4..prefix.len().min(name_end)];
    if !available.iter().all(|&b| is_name_byte(b)) {
        return Detection::Unknown;
    }
    match prefix.get(name_end) {
        None => Detection::NeedMore(name_end + 1 - prefix.len()),
        Some(1..=4) => Detection::Found(Detected::Unframed(Protocol::Binary)),
        Some(_) => Detection::Unknown,
    }
}

fn is_name_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b':' | b'-' | b'$')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recognises_each_transport() {
        let tt = [0, 0, 0, 20, 0x10, 0x00];
        assert_eq!(detect(&tt), Detection::Found(Detected::TTHeader));
        let framed = [0, 0, 0, 20, 0x80, 0x01, 0, 1];
        assert_eq!(
            detect(&framed),
            Detection::Found(Detected::Framed(Protocol::Binary))
        );
        let framed_compact = [0, 0, 0, 20, 0x82, 0x21];
        assert_eq!(
            detect(&framed_compact),
            Detection::Found(Detected::Framed(Protocol::Compact))
        );
        assert_eq!(
            detect(&[0x80, 0x01, 0x00, 0x01]),
            Detection::Found(Detected::Unframed(Protocol::Binary))
        );
        assert_eq!(
            detect(&[0x82, 0x21]),
            Detection::Found(Detected::Unframed(Protocol::Compact))
        );
        assert_eq!(detect(HTTP2_PREFACE), Detection::Found(Detected::Http2));
        // HTTP/1.1 request lines, and every prefix of them and of the preface waits for more.
        for line in [
            &b"POST /echo/Echo HTTP/1.1\r\n"[..],
            b"GET / HTTP/1.1\r\n",
            b"PUT /x",
            b"PATCH /",
        ] {
            assert_eq!(detect(line), Detection::Found(Detected::Http1), "{line:?}");
            let space = line.iter().position(|b| *b == b' ').unwrap();
            for n in 1..=space {
                assert!(
                    matches!(detect(&line[..n]), Detection::NeedMore(_)),
                    "{:?}",
                    &line[..n]
                );
            }
        }
        for n in 1..HTTP2_PREFACE.len() {
            assert!(
                matches!(detect(&HTTP2_PREFACE[..n]), Detection::NeedMore(_)),
                "{n}"
            );
        }
        assert_eq!(detect(b"POSTX"), Detection::Unknown);
        assert_eq!(detect(b"PRX"), Detection::Unknown);
        let mut non_strict = vec![0, 0, 0, 4];
        non_strict.extend_from_slice(b"Echo\x01\0\0\0\x07");
        assert_eq!(
            detect(&non_strict),
            Detection::Found(Detected::Unframed(Protocol::Binary))
        );
    }

    #[test]
    fn short_prefixes_ask_for_more_and_garbage_is_unknown() {
        assert_eq!(detect(&[]), Detection::NeedMore(1));
        assert_eq!(detect(&[0, 0, 0]), Detection::NeedMore(3));
        assert_eq!(detect(b"PRI * HT"), Detection::NeedMore(16));
        assert_eq!(detect(&[0x80]), Detection::NeedMore(1));
        assert_eq!(
            detect(b"GET / HTTP/1.1\r\n"),
            Detection::Found(Detected::Http1)
        );
        assert_eq!(detect(b"GETX / HTTP/1.1\r\n"), Detection::Unknown);
        assert_eq!(detect(b"PRX"), Detection::Unknown);
        assert_eq!(detect(&[0xff, 0, 0, 0, 0, 0]), Detection::Unknown);
        assert_eq!(detect(&[0x80, 0x02]), Detection::Unknown);
        assert_eq!(detect(&[0, 0, 0, 4, b'E', b'c']), Detection::NeedMore(3));
        assert_eq!(detect(&[0, 0, 0, 4, b'E', 0xff]), Detection::Unknown);
    }
}
