//! The Thrift message header (name, type, seqid) in Binary (strict and old non-strict) and
//! Compact protocols: the only part of a message fnmesh reads.

use bytes::{BufMut, BytesMut};

use crate::{
    wire::{put_varint, Cursor, Stop, Walk},
    CodecError, Limits,
};

/// A Thrift protocol (the encoding of a message), as opposed to its transport (the framing).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Protocol {
    Binary,
    Compact,
}

impl Protocol {
    /// The protocol id a TTHeader names it by.
    pub fn ttheader_id(self) -> u8 {
        match self {
            Protocol::Binary => 0,
            Protocol::Compact => 2,
        }
    }

    pub fn from_ttheader_id(id: u8) -> Option<Self> {
        match id {
            0 => Some(Protocol::Binary),
            2 => Some(Protocol::Compact),
            _ => None,
        }
    }
}

/// The Thrift message type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MessageType {
    Call = 1,
    Reply = 2,
    Exception = 3,
    Oneway = 4,
}

impl MessageType {
    pub fn from_u8(v: u8) -> Option<Self> {
        match v {
            1 => Some(MessageType::Call),
            2 => Some(MessageType::Reply),
            3 => Some(MessageType::Exception),
            4 => Some(MessageType::Oneway),
            _ => None,
        }
    }
}

/// The message of a whole frame as [`crate::FrameDecoder::split`] returns it (any transport),
/// found at its fixed place without parsing the frame.
fn message_of(frame: &[u8]) -> Option<&[u8]> {
    Some(match frame {
        // TTHeader: the message follows the header (and Volo's inner Framed length).
        [_, _, _, _, 0x10, 0x00, _, _, _, _, _, _, hi, lo, ..] => {
            let at = 14 + usize::from(u16::from_be_bytes([*hi, *lo])) * 4;
            match frame.get(at..)? {
                m @ [0x80 | COMPACT_PROTOCOL_ID, ..] => m,
                m => m.get(4..).unwrap_or_default(),
            }
        }
        // Unframed strict Binary or Compact: a length-prefixed frame cannot start with these
        // bytes (its length would be 2 GiB or more), but a Compact header's seqid varint can
        // put 0x82 where a Framed message's would be.
        [0x80, 0x01, ..] | [COMPACT_PROTOCOL_ID, ..] => frame,
        [_, _, _, _, 0x80, 0x01, ..] | [_, _, _, _, COMPACT_PROTOCOL_ID, ..] => &frame[4..],
        _ => frame,
    })
}

/// Whether a whole frame as [`crate::FrameDecoder::split`] returns it (any transport) carries an
/// EXCEPTION message, read at the message header's fixed place without parsing the frame. The old
/// Binary form without a version word reads as no exception.
pub fn is_exception(frame: &[u8]) -> bool {
    match message_of(frame) {
        Some([0x80, 0x01, _, t, ..]) => t & 0x07 == MessageType::Exception as u8,
        Some([COMPACT_PROTOCOL_ID, tv, ..]) => tv >> 5 == MessageType::Exception as u8,
        _ => false,
    }
}

/// What a reply says, read from its message header and the first field header of its result
/// struct: nothing else of the payload is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyKind {
    /// A REPLY whose result is field 0 (the method's return value) or empty (a void method).
    Success,
    /// A REPLY whose result is another field: an exception the IDL declares.
    Declared,
    /// An EXCEPTION message (a TApplicationException).
    Exception,
}

/// The [`ReplyKind`] of a whole reply frame (any transport), or `None` when its message header
/// cannot be read (Binary strict or Compact; the old Binary form reads as `None`).
pub fn reply_kind(frame: &[u8]) -> Option<ReplyKind> {
    let message = message_of(frame)?;
    let id = match *message {
        [0x80, 0x01, _, t, ..] if t & 0x07 == MessageType::Exception as u8 => {
            return Some(ReplyKind::Exception)
        }
        [COMPACT_PROTOCOL_ID, tv, ..] if tv >> 5 == MessageType::Exception as u8 => {
            return Some(ReplyKind::Exception)
        }
        // Binary: version and type (4), the name's length (4) and the name, the seqid (4),
        // then the result struct's first field: its type (0: STOP, a void result) and id.
        [0x80, 0x01, _, _, a, b, c, d, ..] => {
            let at = 12 + u32::from_be_bytes([a, b, c, d]) as usize;
            match *message.get(at..)? {
                [0, ..] => 0,
                [_, hi, lo, ..] => i16::from_be_bytes([hi, lo]),
                _ => return None,
            }
        }
        [COMPACT_PROTOCOL_ID, _, ref rest @ ..] => {
            let (_, n) = varint(rest)?;
            let (name, m) = varint(rest.get(n..)?)?;
            let at = n.checked_add(m)?.checked_add(usize::try_from(name).ok()?)?;
            match *rest.get(at..)? {
                [0, ..] => 0,
                [h, ref more @ ..] => match h >> 4 {
                    0 => {
                        let (z, _) = varint(more)?;
                        ((z >> 1) as i64 ^ -((z & 1) as i64)) as i16
                    }
                    delta => i16::from(delta),
                },
                _ => return None,
            }
        }
        _ => return None,
    };
    Some(match id {
        0 => ReplyKind::Success,
        _ => ReplyKind::Declared,
    })
}

/// A Compact varint at the start of `b` (at most 10 bytes): its value and length.
fn varint(b: &[u8]) -> Option<(u64, usize)> {
    let mut v = 0u64;
    for (i, byte) in b.iter().take(10).enumerate() {
        v |= u64::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            return Some((v, i + 1));
        }
    }
    None
}

pub(crate) const BINARY_VERSION_1: u32 = 0x8001_0000;
pub(crate) const COMPACT_PROTOCOL_ID: u8 = 0x82;
pub(crate) const COMPACT_VERSION: u8 = 1;

/// A parsed message header. Positions are offsets into the buffer it was parsed from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MessageHeader {
    pub protocol: Protocol,
    /// Binary only: false for the old form without a version word.
    pub strict: bool,
    pub kind: MessageType,
    pub seqid: i32,
    /// Where the message starts.
    pub start: usize,
    /// The name, as a range (validated UTF-8).
    pub name_start: usize,
    pub name_end: usize,
    /// Where the seqid is written, and its width on the wire (4, or 1..=5 for a compact varint).
    pub seqid_at: usize,
    pub seqid_width: usize,
    /// Where the header ends and the argument or result struct begins.
    pub end: usize,
}

impl MessageHeader {
    /// Parses the header of the message that starts at `start`. `hint` is the protocol a
    /// surrounding TTHeader announced, if any; the message's own marker byte decides when present.
    pub(crate) fn parse(
        buf: &[u8],
        start: usize,
        hint: Option<Protocol>,
        limits: &Limits,
    ) -> Walk<MessageHeader> {
        if let Some(m) = strict_binary_fast(buf, start, limits) {
            return Ok(m);
        }
        let mut cur = Cursor::new(buf, start);
        let first = *buf.get(start).ok_or(Stop::Incomplete(start + 1))?;
        match first {
            0x80 => parse_strict_binary(&mut cur, limits),
            COMPACT_PROTOCOL_ID => parse_compact(&mut cur, limits),
            _ if hint != Some(Protocol::Compact) => parse_non_strict_binary(&mut cur, limits),
            _ => Err(CodecError::malformed(
                "compact message header",
                start,
                "missing protocol id 0x82",
            )
            .into()),
        }
    }

    /// The name as text (it was validated as UTF-8 when parsed).
    pub fn name<'a>(&self, buf: &'a [u8]) -> &'a str {
        buf.get(self.name_start..self.name_end)
            .and_then(|b| std::str::from_utf8(b).ok())
            .unwrap_or("")
    }

    /// Writes a message header into `dst`.
    pub fn encode(
        dst: &mut BytesMut,
        protocol: Protocol,
        strict: bool,
        kind: MessageType,
        name: &str,
        seqid: i32,
    ) {
        match protocol {
            Protocol::Binary if strict => {
                dst.put_u32(BINARY_VERSION_1 | kind as u32);
                dst.put_u32(name.len() as u32);
                dst.put_slice(name.as_bytes());
                dst.put_i32(seqid);
            }
            Protocol::Binary => {
                dst.put_u32(name.len() as u32);
                dst.put_slice(name.as_bytes());
                dst.put_u8(kind as u8);
                dst.put_i32(seqid);
            }
            Protocol::Compact => {
                dst.put_u8(COMPACT_PROTOCOL_ID);
                dst.put_u8(((kind as u8) << 5) | COMPACT_VERSION);
                put_varint(dst, u64::from(seqid as u32));
                put_varint(dst, name.len() as u64);
                dst.put_slice(name.as_bytes());
            }
        }
    }
}

/// The common case, a well-formed strict Binary header wholly in `buf`, read directly. Anything
/// else (short, malformed, another protocol) returns `None` and takes the general path, which
/// says precisely what is wrong.
#[inline]
fn strict_binary_fast(buf: &[u8], start: usize, limits: &Limits) -> Option<MessageHeader> {
    let fixed = buf.get(start..)?.first_chunk::<8>()?;
    let word = u32::from_be_bytes([fixed[0], fixed[1], fixed[2], fixed[3]]);
    if word & 0xffff_ff00 != BINARY_VERSION_1 {
        return None;
    }
    let kind = MessageType::from_u8((word & 0xff) as u8)?;
    let len = u32::from_be_bytes([fixed[4], fixed[5], fixed[6], fixed[7]]) as usize;
    if len > limits.max_name_len {
        return None;
    }
    let name_start = start + 8;
    let name_end = name_start + len;
    let name = buf.get(name_start..name_end)?;
    if !name.is_ascii() {
        return None;
    }
    let seqid = buf.get(name_end..)?.first_chunk::<4>()?;
    let seqid = i32::from_be_bytes(*seqid);
    Some(binary_header(
        true,
        kind,
        start,
        (name_start, name_end),
        name_end,
        seqid,
    ))
}

/// A Binary header (strict or not): 4-byte seqid at `seqid_at`, struct right after it.
fn binary_header(
    strict: bool,
    kind: MessageType,
    start: usize,
    (name_start, name_end): (usize, usize),
    seqid_at: usize,
    seqid: i32,
) -> MessageHeader {
    MessageHeader {
        protocol: Protocol::Binary,
        strict,
        kind,
        seqid,
        start,
        name_start,
        name_end,
        seqid_at,
        seqid_width: 4,
        end: seqid_at + 4,
    }
}

fn message_type(v: u8, at: usize) -> Walk<MessageType> {
    MessageType::from_u8(v)
        .ok_or_else(|| CodecError::malformed("message header", at, "unknown message type").into())
}

fn name_range(cur: &mut Cursor<'_>, len: u64, limits: &Limits) -> Walk<(usize, usize)> {
    let at = cur.pos();
    if len > limits.max_name_len as u64 {
        return Err(CodecError::LimitExceeded {
            what: "message name length",
            offset: at,
            value: len,
            limit: limits.max_name_len as u64,
        }
        .into());
    }
    let name = cur.take(len as usize)?;
    // Method names are ASCII in practice; the full UTF-8 check runs only when they are not.
    if !name.is_ascii() && std::str::from_utf8(name).is_err() {
        return Err(CodecError::malformed("message name", at, "not valid UTF-8").into());
    }
    Ok((at, at + len as usize))
}

fn parse_strict_binary(cur: &mut Cursor<'_>, limits: &Limits) -> Walk<MessageHeader> {
    let start = cur.pos();
    let word = cur.u32()?;
    if word & 0xffff_ff00 != BINARY_VERSION_1 {
        return Err(CodecError::malformed("binary message header", start, "bad version").into());
    }
    let kind = message_type((word & 0xff) as u8, start + 3)?;
    let len = cur.u32()?;
    if len > i32::MAX as u32 {
        return Err(CodecError::malformed(
            "binary message header",
            start + 4,
            "negative name length",
        )
        .into());
    }
    let name = name_range(cur, u64::from(len), limits)?;
    let seqid_at = cur.pos();
    let seqid = cur.u32()? as i32;
    Ok(binary_header(true, kind, start, name, seqid_at, seqid))
}

fn parse_non_strict_binary(cur: &mut Cursor<'_>, limits: &Limits) -> Walk<MessageHeader> {
    let start = cur.pos();
    let len = cur.u32()?;
    if len > i32::MAX as u32 {
        return Err(
            CodecError::malformed("binary message header", start, "negative name length").into(),
        );
    }
    let name = name_range(cur, u64::from(len), limits)?;
    let at = cur.pos();
    let kind = message_type(cur.u8()?, at)?;
    let seqid_at = cur.pos();
    let seqid = cur.u32()? as i32;
    Ok(binary_header(false, kind, start, name, seqid_at, seqid))
}

fn parse_compact(cur: &mut Cursor<'_>, limits: &Limits) -> Walk<MessageHeader> {
    let start = cur.pos();
    cur.u8()?; // protocol id, checked by the caller
    let tv = cur.u8()?;
    if tv & 0x1f != COMPACT_VERSION {
        return Err(
            CodecError::malformed("compact message header", start + 1, "bad version").into(),
        );
    }
    let kind = message_type(tv >> 5, start + 1)?;
    let seqid_at = cur.pos();
    let seqid = cur.varint(5, "compact seqid")?;
    if seqid > u64::from(u32::MAX) {
        return Err(CodecError::malformed(
            "compact message header",
            seqid_at,
            "seqid is over 32 bits",
        )
        .into());
    }
    let seqid_width = cur.pos() - seqid_at;
    let len = cur.varint(5, "compact name length")?;
    let (name_start, name_end) = name_range(cur, len, limits)?;
    Ok(MessageHeader {
        protocol: Protocol::Compact,
        strict: true,
        kind,
        seqid: seqid as u32 as i32,
        start,
        name_start,
        name_end,
        seqid_at,
        seqid_width,
        end: cur.pos(),
    })
}
