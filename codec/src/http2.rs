//! HTTP/2 framing (RFC 9113 sections 4 and 6) for a relay: the 9-byte frame head, the payloads of
//! the frames a relay must interpret (padding and priority around a header block, SETTINGS,
//! WINDOW_UPDATE, RST_STREAM, GOAWAY, PING) and writers for the frames it sends. Pure and
//! synchronous; no input makes it panic. DATA payloads are never touched: a relay forwards them.

use bytes::BufMut;

/// Bytes in a frame head.
pub const FRAME_HEAD_LEN: usize = 9;
/// SETTINGS_MAX_FRAME_SIZE until a peer says otherwise, and its least allowed value.
pub const DEFAULT_MAX_FRAME: usize = 16_384;
/// SETTINGS_INITIAL_WINDOW_SIZE until a peer says otherwise; also every connection's first window.
pub const DEFAULT_WINDOW: u32 = 65_535;
/// The largest flow-control window.
pub const MAX_WINDOW: u32 = (1 << 31) - 1;

/// Frame types.
pub mod kind {
    pub const DATA: u8 = 0x0;
    pub const HEADERS: u8 = 0x1;
    pub const PRIORITY: u8 = 0x2;
    pub const RST_STREAM: u8 = 0x3;
    pub const SETTINGS: u8 = 0x4;
    pub const PUSH_PROMISE: u8 = 0x5;
    pub const PING: u8 = 0x6;
    pub const GOAWAY: u8 = 0x7;
    pub const WINDOW_UPDATE: u8 = 0x8;
    pub const CONTINUATION: u8 = 0x9;
}

/// Frame flags.
pub mod flag {
    pub const END_STREAM: u8 = 0x1;
    pub const ACK: u8 = 0x1;
    pub const END_HEADERS: u8 = 0x4;
    pub const PADDED: u8 = 0x8;
    pub const PRIORITY: u8 = 0x20;
}

/// SETTINGS identifiers.
pub mod setting {
    pub const HEADER_TABLE_SIZE: u16 = 0x1;
    pub const ENABLE_PUSH: u16 = 0x2;
    pub const MAX_CONCURRENT_STREAMS: u16 = 0x3;
    pub const INITIAL_WINDOW_SIZE: u16 = 0x4;
    pub const MAX_FRAME_SIZE: u16 = 0x5;
    pub const MAX_HEADER_LIST_SIZE: u16 = 0x6;
}

/// Error codes of RST_STREAM and GOAWAY.
pub mod reason {
    pub const NO_ERROR: u32 = 0x0;
    pub const PROTOCOL_ERROR: u32 = 0x1;
    pub const INTERNAL_ERROR: u32 = 0x2;
    pub const FLOW_CONTROL_ERROR: u32 = 0x3;
    pub const STREAM_CLOSED: u32 = 0x5;
    pub const FRAME_SIZE_ERROR: u32 = 0x6;
    pub const REFUSED_STREAM: u32 = 0x7;
    pub const CANCEL: u32 = 0x8;
    pub const COMPRESSION_ERROR: u32 = 0x9;
    pub const ENHANCE_YOUR_CALM: u32 = 0xb;
}

/// A frame that breaks the framing rules, and the error code to end the connection (or, for
/// [`FrameError::stream`], the stream) with.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("bad HTTP/2 frame (type {kind:#x}): {what}")]
pub struct FrameError {
    pub kind: u8,
    pub what: &'static str,
    pub reason: u32,
    /// The error concerns only this stream (RST_STREAM), not the connection (GOAWAY).
    pub stream: bool,
}

impl FrameError {
    fn connection(kind: u8, reason: u32, what: &'static str) -> FrameError {
        FrameError {
            kind,
            what,
            reason,
            stream: false,
        }
    }
}

/// A frame head: payload length, type, flags and stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHead {
    pub len: usize,
    pub kind: u8,
    pub flags: u8,
    pub stream: u32,
}

impl FrameHead {
    /// The head at the start of `buf`; `None` until 9 bytes are there. The reserved bit of the
    /// stream identifier is ignored, as RFC 9113 4.1 asks.
    pub fn parse(buf: &[u8]) -> Option<FrameHead> {
        let b: &[u8; FRAME_HEAD_LEN] = buf.get(..FRAME_HEAD_LEN)?.try_into().ok()?;
        Some(FrameHead {
            len: usize::from(b[0]) << 16 | usize::from(b[1]) << 8 | usize::from(b[2]),
            kind: b[3],
            flags: b[4],
            stream: u32::from_be_bytes([b[5], b[6], b[7], b[8]]) & MAX_WINDOW,
        })
    }

    /// Refuses a payload over the SETTINGS_MAX_FRAME_SIZE we announced, before any of it is read.
    pub fn check(&self, max_frame: usize) -> Result<(), FrameError> {
        if self.len > max_frame {
            return Err(FrameError::connection(
                self.kind,
                reason::FRAME_SIZE_ERROR,
                "payload over SETTINGS_MAX_FRAME_SIZE",
            ));
        }
        Ok(())
    }

    pub fn is(&self, flag: u8) -> bool {
        self.flags & flag != 0
    }

    pub fn write(&self, dst: &mut impl BufMut) {
        let len = (self.len as u32).to_be_bytes();
        dst.put_slice(&len[1..]);
        dst.put_u8(self.kind);
        dst.put_u8(self.flags);
        dst.put_u32(self.stream & MAX_WINDOW);
    }
}

/// RFC 9113 section 6: SETTINGS, PING and GOAWAY belong to the connection, and on a stream are a
/// connection error; DATA, HEADERS, PRIORITY, RST_STREAM, PUSH_PROMISE and CONTINUATION belong to
/// a stream, and on stream 0 are one too (both PROTOCOL_ERROR).
pub fn check_stream(head: &FrameHead) -> Result<(), FrameError> {
    let (ok, what) = match head.kind {
        kind::SETTINGS | kind::PING | kind::GOAWAY => {
            (head.stream == 0, "a connection frame on a stream")
        }
        kind::DATA
        | kind::HEADERS
        | kind::PRIORITY
        | kind::RST_STREAM
        | kind::PUSH_PROMISE
        | kind::CONTINUATION => (head.stream != 0, "a stream frame on stream 0"),
        _ => (true, ""),
    };
    if ok {
        return Ok(());
    }
    Err(FrameError::connection(
        head.kind,
        reason::PROTOCOL_ERROR,
        what,
    ))
}

/// The stream a PRIORITY frame's payload (or a HEADERS frame's priority fields) makes this stream
/// depend on. A PRIORITY frame that is not 5 bytes is a stream error (RFC 9113 6.3).
pub fn priority(head: &FrameHead, fields: &[u8]) -> Result<u32, FrameError> {
    let Some(b) = fields
        .get(..4)
        .filter(|_| head.kind != kind::PRIORITY || fields.len() == 5)
    else {
        return Err(FrameError {
            kind: head.kind,
            what: "PRIORITY is not 5 bytes",
            reason: reason::FRAME_SIZE_ERROR,
            stream: true,
        });
    };
    Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]) & MAX_WINDOW)
}

/// The payload of a DATA or HEADERS frame without its padding.
pub fn unpad<'a>(head: &FrameHead, payload: &'a [u8]) -> Result<&'a [u8], FrameError> {
    if !head.is(flag::PADDED) {
        return Ok(payload);
    }
    let Some((&pad, rest)) = payload.split_first() else {
        return Err(FrameError::connection(
            head.kind,
            reason::FRAME_SIZE_ERROR,
            "PADDED without a pad length",
        ));
    };
    let keep = rest.len().checked_sub(usize::from(pad)).ok_or_else(|| {
        FrameError::connection(
            head.kind,
            reason::PROTOCOL_ERROR,
            "padding longer than the payload",
        )
    })?;
    Ok(&rest[..keep])
}

/// The header block fragment of a HEADERS frame: padding and priority removed. A stream that
/// depends on itself is a PROTOCOL_ERROR (RFC 9113 5.3.1; of the connection here, since the
/// block must still be decoded to keep the HPACK table in step).
pub fn header_block<'a>(head: &FrameHead, payload: &'a [u8]) -> Result<&'a [u8], FrameError> {
    let block = unpad(head, payload)?;
    if !head.is(flag::PRIORITY) {
        return Ok(block);
    }
    let rest = block.get(5..).ok_or_else(|| {
        FrameError::connection(
            head.kind,
            reason::FRAME_SIZE_ERROR,
            "PRIORITY without its 5 bytes",
        )
    })?;
    if priority(head, block)? == head.stream {
        return Err(FrameError::connection(
            head.kind,
            reason::PROTOCOL_ERROR,
            "a stream that depends on itself",
        ));
    }
    Ok(rest)
}

/// Hands each (identifier, value) of a SETTINGS payload to `f`.
pub fn settings(
    head: &FrameHead,
    payload: &[u8],
    mut f: impl FnMut(u16, u32),
) -> Result<(), FrameError> {
    if head.stream != 0 {
        return Err(FrameError::connection(
            head.kind,
            reason::PROTOCOL_ERROR,
            "SETTINGS on a stream",
        ));
    }
    if payload.len() % 6 != 0 || (head.is(flag::ACK) && !payload.is_empty()) {
        return Err(FrameError::connection(
            head.kind,
            reason::FRAME_SIZE_ERROR,
            "SETTINGS length not a multiple of 6 (or an ACK with a payload)",
        ));
    }
    for s in payload.chunks_exact(6) {
        f(
            u16::from_be_bytes([s[0], s[1]]),
            u32::from_be_bytes([s[2], s[3], s[4], s[5]]),
        );
    }
    Ok(())
}

/// A payload of exactly four bytes, as a number: WINDOW_UPDATE's increment (reserved bit
/// dropped), RST_STREAM's error code.
fn four(head: &FrameHead, payload: &[u8]) -> Result<u32, FrameError> {
    let b: [u8; 4] = payload.try_into().map_err(|_| {
        FrameError::connection(
            head.kind,
            reason::FRAME_SIZE_ERROR,
            "payload is not 4 bytes",
        )
    })?;
    Ok(u32::from_be_bytes(b))
}

/// A WINDOW_UPDATE's increment. Zero is an error of the stream it names (of the connection for
/// stream 0).
pub fn window_update(head: &FrameHead, payload: &[u8]) -> Result<u32, FrameError> {
    let increment = four(head, payload)? & MAX_WINDOW;
    if increment == 0 {
        return Err(FrameError {
            kind: head.kind,
            what: "WINDOW_UPDATE of 0",
            reason: reason::PROTOCOL_ERROR,
            stream: head.stream != 0,
        });
    }
    Ok(increment)
}

/// A RST_STREAM's error code.
pub fn rst_stream(head: &FrameHead, payload: &[u8]) -> Result<u32, FrameError> {
    four(head, payload)
}

/// A GOAWAY's last stream identifier, error code and debug data.
pub fn goaway<'a>(head: &FrameHead, payload: &'a [u8]) -> Result<(u32, u32, &'a [u8]), FrameError> {
    if payload.len() < 8 {
        return Err(FrameError::connection(
            head.kind,
            reason::FRAME_SIZE_ERROR,
            "GOAWAY shorter than 8 bytes",
        ));
    }
    let (last, rest) = payload.split_at(4);
    let (code, debug) = rest.split_at(4);
    Ok((
        u32::from_be_bytes([last[0], last[1], last[2], last[3]]) & MAX_WINDOW,
        u32::from_be_bytes([code[0], code[1], code[2], code[3]]),
        debug,
    ))
}

/// A PING's 8 opaque bytes.
pub fn ping(head: &FrameHead, payload: &[u8]) -> Result<[u8; 8], FrameError> {
    payload.try_into().map_err(|_| {
        FrameError::connection(head.kind, reason::FRAME_SIZE_ERROR, "PING is not 8 bytes")
    })
}

/// Writes a SETTINGS frame with `values`, or an empty ACK.
pub fn write_settings(dst: &mut impl BufMut, values: &[(u16, u32)], ack: bool) {
    FrameHead {
        len: values.len() * 6,
        kind: kind::SETTINGS,
        flags: if ack { flag::ACK } else { 0 },
        stream: 0,
    }
    .write(dst);
    for &(id, value) in values {
        dst.put_u16(id);
        dst.put_u32(value);
    }
}

pub fn write_window_update(dst: &mut impl BufMut, stream: u32, increment: u32) {
    FrameHead {
        len: 4,
        kind: kind::WINDOW_UPDATE,
        flags: 0,
        stream,
    }
    .write(dst);
    dst.put_u32(increment & MAX_WINDOW);
}

pub fn write_rst_stream(dst: &mut impl BufMut, stream: u32, code: u32) {
    FrameHead {
        len: 4,
        kind: kind::RST_STREAM,
        flags: 0,
        stream,
    }
    .write(dst);
    dst.put_u32(code);
}

pub fn write_goaway(dst: &mut impl BufMut, last_stream: u32, code: u32, debug: &[u8]) {
    FrameHead {
        len: 8 + debug.len(),
        kind: kind::GOAWAY,
        flags: 0,
        stream: 0,
    }
    .write(dst);
    dst.put_u32(last_stream & MAX_WINDOW);
    dst.put_u32(code);
    dst.put_slice(debug);
}

pub fn write_ping(dst: &mut impl BufMut, data: [u8; 8], ack: bool) {
    FrameHead {
        len: 8,
        kind: kind::PING,
        flags: if ack { flag::ACK } else { 0 },
        stream: 0,
    }
    .write(dst);
    dst.put_slice(&data);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heads_round_trip_and_ignore_the_reserved_bit() {
        let head = FrameHead {
            len: 0x01_02_03,
            kind: kind::HEADERS,
            flags: flag::END_HEADERS | flag::END_STREAM,
            stream: 7,
        };
        let mut b = Vec::new();
        head.write(&mut b);
        assert_eq!(b, [1, 2, 3, 1, 5, 0, 0, 0, 7]);
        assert_eq!(FrameHead::parse(&b), Some(head));
        assert_eq!(FrameHead::parse(&b[..8]), None);
        b[5] |= 0x80;
        assert_eq!(FrameHead::parse(&b).map(|h| h.stream), Some(7));
        assert!(head.check(DEFAULT_MAX_FRAME).is_err());
        assert!(head.check(1 << 24).is_ok());
    }

    #[test]
    fn padding_and_priority_are_removed_or_refused() {
        let head = |flags| FrameHead {
            len: 0,
            kind: kind::HEADERS,
            flags,
            stream: 1,
        };
        assert_eq!(unpad(&head(0), b"abc"), Ok(&b"abc"[..]));
        assert_eq!(unpad(&head(flag::PADDED), b"\x02abcXY"), Ok(&b"abc"[..]));
        assert_eq!(unpad(&head(flag::PADDED), b"\x00"), Ok(&b""[..]));
        assert!(unpad(&head(flag::PADDED), b"\x03ab").is_err());
        assert!(unpad(&head(flag::PADDED), b"").is_err());
        let both = head(flag::PADDED | flag::PRIORITY);
        assert_eq!(
            header_block(&both, b"\x01\0\0\0\x03\x10blockP"),
            Ok(&b"block"[..])
        );
        assert!(header_block(&head(flag::PRIORITY), b"\0\0\0").is_err());
    }

    #[test]
    fn control_frames_round_trip() {
        let mut b = Vec::new();
        write_settings(
            &mut b,
            &[
                (setting::INITIAL_WINDOW_SIZE, 1 << 20),
                (setting::ENABLE_PUSH, 0),
            ],
            false,
        );
        let h = FrameHead::parse(&b).unwrap();
        let mut seen = Vec::new();
        settings(&h, &b[FRAME_HEAD_LEN..], |id, v| seen.push((id, v))).unwrap();
        assert_eq!(seen, [(4, 1 << 20), (2, 0)]);
        assert!(settings(&h, &b[FRAME_HEAD_LEN..FRAME_HEAD_LEN + 5], |_, _| ()).is_err());
        let ack = FrameHead {
            flags: flag::ACK,
            ..h
        };
        assert!(settings(&ack, &b[FRAME_HEAD_LEN..], |_, _| ()).is_err());
        let on_stream = FrameHead { stream: 1, ..h };
        assert!(settings(&on_stream, &[], |_, _| ()).is_err());
        assert!(check_stream(&on_stream).is_err());
        assert!(check_stream(&h).is_ok());

        let mut b = Vec::new();
        write_window_update(&mut b, 3, 1000);
        let h = FrameHead::parse(&b).unwrap();
        assert_eq!((h.kind, h.stream), (kind::WINDOW_UPDATE, 3));
        assert_eq!(window_update(&h, &b[FRAME_HEAD_LEN..]), Ok(1000));
        let zero = window_update(&h, &[0, 0, 0, 0]).unwrap_err();
        assert!(zero.stream);
        assert!(window_update(&h, &[0, 0, 1]).is_err());

        let mut b = Vec::new();
        write_rst_stream(&mut b, 5, reason::CANCEL);
        let h = FrameHead::parse(&b).unwrap();
        assert_eq!(rst_stream(&h, &b[FRAME_HEAD_LEN..]), Ok(reason::CANCEL));

        let mut b = Vec::new();
        write_goaway(&mut b, 9, reason::NO_ERROR, b"draining");
        let h = FrameHead::parse(&b).unwrap();
        assert_eq!(
            goaway(&h, &b[FRAME_HEAD_LEN..]),
            Ok((9, 0, &b"draining"[..]))
        );
        assert!(goaway(&h, &[0; 7]).is_err());

        let mut b = Vec::new();
        write_ping(&mut b, *b"12345678", true);
        let h = FrameHead::parse(&b).unwrap();
        assert!(h.is(flag::ACK));
        assert_eq!(ping(&h, &b[FRAME_HEAD_LEN..]), Ok(*b"12345678"));
        assert!(ping(&h, b"1234567").is_err());
    }
}
