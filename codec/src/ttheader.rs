//! TTHeader, the transport header of Kitex and Volo: parsed into offsets over the frame, never
//! copied; iterated on demand; and built for replies and rewrites.
//!
//! Layout (big-endian): `u32 length`, `u16 magic 0x1000`, `u16 flags`, `u32 seqid`, `u16 header
//! size in 4-byte words`, then that many words: `u8 protocol`, `u8 transform count` + ids, and info
//! blocks (padding, string key/values, int key/values, ACL token). The payload follows, either the
//! Thrift message itself or (as Volo sends it) a Framed `u32 length` and then the message.

use bytes::{BufMut, BytesMut};

use crate::{
    message::Protocol,
    wire::{Cursor, Stop, Walk},
    CodecError, Limits,
};

pub const TTHEADER_MAGIC: u16 = 0x1000;
/// Bytes before the variable header: length, magic, flags, seqid, header size.
pub(crate) const FIXED_LEN: usize = 14;

/// Info block ids.
pub mod info {
    pub const PADDING: u8 = 0x00;
    pub const KEY_VALUE: u8 = 0x01;
    pub const INT_KEY_VALUE: u8 = 0x10;
    pub const ACL_TOKEN: u8 = 0x11;
}

/// Well-known int keys (Kitex `transmeta`).
pub mod int_key {
    pub const FROM_SERVICE: u16 = 3;
    pub const TO_SERVICE: u16 = 6;
    pub const TO_METHOD: u16 = 9;
    pub const RPC_TIMEOUT: u16 = 12;
    pub const CONNECT_TIMEOUT: u16 = 17;
    pub const MSG_TYPE: u16 = 22;
}

/// Well-known string keys.
pub mod str_key {
    pub const IDL_SERVICE_NAME: &[u8] = b"isn";
    pub const BIZ_STATUS: &[u8] = b"biz-status";
    pub const BIZ_MESSAGE: &[u8] = b"biz-message";
    pub const BIZ_EXTRA: &[u8] = b"biz-extra";
    pub const CONN_RESET: &[u8] = b"crrst";
}

/// A byte range in the buffer the header was parsed from, or [`Span::ABSENT`]. (Not an
/// `Option<Span>`: 8 bytes instead of 12 for each of the header's well-known keys, and the header
/// is copied into every decoded frame.)
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Span {
    start: u32,
    end: u32,
}

impl Span {
    const ABSENT: Span = Span {
        start: u32::MAX,
        end: u32::MAX,
    };

    fn new(start: usize, end: usize) -> Self {
        // Headers are bounded by `max_header_size`, far below u32::MAX.
        Span {
            start: start as u32,
            end: end as u32,
        }
    }

    fn present(self) -> Option<Span> {
        (self.start != u32::MAX).then_some(self)
    }

    pub(crate) fn get<'a>(&self, buf: &'a [u8]) -> &'a [u8] {
        buf.get(self.start as usize..self.end as usize)
            .unwrap_or(&[])
    }

    pub(crate) fn start(&self) -> usize {
        self.start as usize
    }

    pub(crate) fn end(&self) -> usize {
        self.end as usize
    }
}

/// A parsed TTHeader: fixed fields by value, everything else as offsets into the frame's head.
/// Parsing validates every info block, so the iterators below walk known-good bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TTHeader {
    pub flags: u16,
    pub seqid: u32,
    pub protocol: Protocol,
    transforms: Span,
    /// Info blocks, from after the transform ids to the end of the header (padding included).
    info: Span,
    acl: Span,
    isn: Span,
    to_service: Span,
    to_method: Span,
    from_service: Span,
    rpc_timeout: Span,
    /// Offset (in the frame) where the payload starts: just past the header.
    pub header_end: usize,
    /// The payload starts with a Framed `u32 length` (Volo's TTHeader + Framed).
    pub inner_framed: bool,
}

fn header_error(at: usize, reason: &'static str) -> Stop {
    CodecError::malformed("ttheader", at, reason).into()
}

impl TTHeader {
    /// Parses the TTHeader of the complete frame `frame` (its length prefix included).
    pub(crate) fn parse(frame: &[u8], limits: &Limits) -> Walk<TTHeader> {
        let Some(fixed) = frame.first_chunk::<FIXED_LEN>() else {
            return Err(Stop::Incomplete(FIXED_LEN));
        };
        let be16 = |i: usize| u16::from_be_bytes([fixed[i], fixed[i + 1]]);
        if be16(4) != TTHEADER_MAGIC {
            return Err(header_error(4, "bad magic"));
        }
        let flags = be16(6);
        let seqid = u32::from_be_bytes([fixed[8], fixed[9], fixed[10], fixed[11]]);
        let header_len = usize::from(be16(12)) * 4;
        if header_len > limits.max_header_size {
            return Err(CodecError::LimitExceeded {
                what: "ttheader header size",
                offset: 12,
                value: header_len as u64,
                limit: limits.max_header_size as u64,
            }
            .into());
        }
        let header_end = FIXED_LEN + header_len;
        if header_end > frame.len() {
            return Err(header_error(12, "header size is larger than the frame"));
        }
        if header_len < 2 {
            return Err(header_error(
                12,
                "header too short for protocol and transforms",
            ));
        }
        let header = &frame[..header_end];
        let protocol_id = header[FIXED_LEN];
        let count = usize::from(header[FIXED_LEN + 1]);
        let protocol = Protocol::from_ttheader_id(protocol_id)
            .ok_or_else(|| header_error(FIXED_LEN, "unsupported protocol id"))?;
        let transforms_at = FIXED_LEN + 2;
        let info_start = transforms_at + count;
        if info_start > header_end {
            return Err(header_error(
                transforms_at,
                "transform ids run past the header size",
            ));
        }
        let mut h = TTHeader {
            flags,
            seqid,
            protocol,
            transforms: Span::new(transforms_at, info_start),
            info: Span::new(info_start, header_end),
            acl: Span::ABSENT,
            isn: Span::ABSENT,
            to_service: Span::ABSENT,
            to_method: Span::ABSENT,
            from_service: Span::ABSENT,
            rpc_timeout: Span::ABSENT,
            header_end,
            inner_framed: false,
        };
        if let Err(e) = h.parse_info(header, info_start) {
            return Err(match e {
                InfoError::RunsPast(at) => header_error(at, "info block runs past the header size"),
                InfoError::UnknownId(at) => header_error(at, "unknown info id"),
            });
        }
        h.inner_framed = has_inner_length(frame, header_end);
        Ok(h)
    }

    /// Validates every info block of `header` (which ends where the header does) and records
    /// where the well-known keys are. A tight loop over the slice with a small error type: it runs
    /// per key/value of every TTHeader request.
    fn parse_info(&mut self, header: &[u8], mut pos: usize) -> Result<(), InfoError> {
        let end = header.len();
        while pos < end {
            let at = pos;
            let past = InfoError::RunsPast(at);
            let id = header[pos];
            pos += 1;
            match id {
                info::PADDING => {}
                info::KEY_VALUE => {
                    let n = be16(header, pos).ok_or(past)?;
                    pos += 2;
                    for _ in 0..n {
                        let klen = usize::from(be16(header, pos).ok_or(past)?);
                        let key_at = pos + 2;
                        let vlen_at = key_at + klen;
                        let vlen = usize::from(be16(header, vlen_at).ok_or(past)?);
                        let value_at = vlen_at + 2;
                        pos = value_at + vlen;
                        if pos > end {
                            return Err(past);
                        }
                        if &header[key_at..vlen_at] == str_key::IDL_SERVICE_NAME {
                            self.isn = Span::new(value_at, pos);
                        }
                    }
                }
                info::INT_KEY_VALUE => {
                    let n = be16(header, pos).ok_or(past)?;
                    pos += 2;
                    for _ in 0..n {
                        // Key and value length in one checked read.
                        let entry = header.get(pos..pos + 4).ok_or(past)?;
                        let key = u16::from_be_bytes([entry[0], entry[1]]);
                        let vlen = usize::from(u16::from_be_bytes([entry[2], entry[3]]));
                        let value_at = pos + 4;
                        pos = value_at + vlen;
                        if pos > end {
                            return Err(past);
                        }
                        let span = Span::new(value_at, pos);
                        match key {
                            int_key::TO_SERVICE => self.to_service = span,
                            int_key::TO_METHOD => self.to_method = span,
                            int_key::FROM_SERVICE => self.from_service = span,
                            int_key::RPC_TIMEOUT => self.rpc_timeout = span,
                            _ => {}
                        }
                    }
                }
                info::ACL_TOKEN => {
                    let len = usize::from(be16(header, pos).ok_or(past)?);
                    let start = pos + 2;
                    pos = start + len;
                    if pos > end {
                        return Err(past);
                    }
                    self.acl = Span::new(start, pos);
                }
                _ => return Err(InfoError::UnknownId(at)),
            }
        }
        Ok(())
    }

    /// Where the Thrift message starts (past the inner Framed length, if any).
    pub fn message_start(&self) -> usize {
        self.header_end + if self.inner_framed { 4 } else { 0 }
    }

    pub fn transforms<'a>(&self, head: &'a [u8]) -> &'a [u8] {
        self.transforms.get(head)
    }

    pub fn acl_token<'a>(&self, head: &'a [u8]) -> Option<&'a [u8]> {
        self.acl.present().map(|s| s.get(head))
    }

    /// String key `isn`: the IDL service name the caller targets.
    pub fn idl_service<'a>(&self, head: &'a [u8]) -> Option<&'a [u8]> {
        self.isn.present().map(|s| s.get(head))
    }

    /// Int key 6, ToService.
    pub fn to_service<'a>(&self, head: &'a [u8]) -> Option<&'a [u8]> {
        self.to_service.present().map(|s| s.get(head))
    }

    /// Int key 9, ToMethod.
    pub fn to_method<'a>(&self, head: &'a [u8]) -> Option<&'a [u8]> {
        self.to_method.present().map(|s| s.get(head))
    }

    /// Int key 3, FromService.
    pub fn from_service<'a>(&self, head: &'a [u8]) -> Option<&'a [u8]> {
        self.from_service.present().map(|s| s.get(head))
    }

    /// Int key 12, RPCTimeout, raw (decimal milliseconds as text).
    pub fn rpc_timeout_raw<'a>(&self, head: &'a [u8]) -> Option<&'a [u8]> {
        self.rpc_timeout.present().map(|s| s.get(head))
    }

    /// Int key 12 as milliseconds; `None` when absent or not a decimal number.
    pub fn rpc_timeout_ms(&self, head: &[u8]) -> Option<u64> {
        let raw = self.rpc_timeout_raw(head)?;
        if raw.is_empty() || raw.len() > 19 || !raw.iter().all(u8::is_ascii_digit) {
            return None;
        }
        Some(
            raw.iter()
                .fold(0u64, |acc, d| acc * 10 + u64::from(d - b'0')),
        )
    }

    /// Every string key/value, in wire order, unknown ones included.
    pub fn str_kvs<'a>(&self, head: &'a [u8]) -> StrKvs<'a> {
        StrKvs {
            blocks: Blocks::new(head, self.info),
            left: 0,
        }
    }

    /// Every int key/value, in wire order, unknown ones included.
    pub fn int_kvs<'a>(&self, head: &'a [u8]) -> IntKvs<'a> {
        IntKvs {
            spans: self.int_kv_spans(head),
        }
    }

    pub(crate) fn int_kv_spans<'a>(&self, head: &'a [u8]) -> IntKvSpans<'a> {
        IntKvSpans {
            head,
            blocks: Blocks::new(head, self.info),
            left: 0,
        }
    }

    /// The value of one string key.
    pub fn str_value<'a>(&self, head: &'a [u8], key: &[u8]) -> Option<&'a [u8]> {
        self.str_kvs(head)
            .filter(|(k, _)| *k == key)
            .map(|(_, v)| v)
            .last()
    }

    /// The value of one int key.
    pub fn int_value<'a>(&self, head: &'a [u8], key: u16) -> Option<&'a [u8]> {
        self.int_kvs(head)
            .filter(|(k, _)| *k == key)
            .map(|(_, v)| v)
            .last()
    }

    pub(crate) fn info_span(&self) -> (usize, usize) {
        (self.info.start(), self.info.end())
    }

    pub(crate) fn transforms_span(&self) -> (usize, usize) {
        (self.transforms.start(), self.transforms.end())
    }
}

/// Why the info blocks are invalid (small, so the hot loop stays cheap).
#[derive(Clone, Copy)]
enum InfoError {
    RunsPast(usize),
    UnknownId(usize),
}

#[inline(always)]
fn be16(buf: &[u8], at: usize) -> Option<u16> {
    match buf.get(at..at.checked_add(2)?) {
        Some(&[a, b]) => Some(u16::from_be_bytes([a, b])),
        _ => None,
    }
}

/// Whether the payload at `at` starts with a Framed length that covers exactly the rest. A bare
/// message cannot start that way: a strict or compact one starts with a byte >= 0x80 (a length
/// over 2 GiB), and a non-strict one whose name took the whole rest would have no room for its type
/// and seqid.
fn has_inner_length(frame: &[u8], at: usize) -> bool {
    let rest = frame.len().saturating_sub(at);
    match frame.get(at..at + 4) {
        Some(&[a, b, c, d]) => u32::from_be_bytes([a, b, c, d]) as usize + 4 == rest,
        _ => false,
    }
}

/// Walks info blocks that parsing already validated; stops quietly on anything unexpected.
struct Blocks<'a> {
    cur: Cursor<'a>,
    end: usize,
}

impl<'a> Blocks<'a> {
    fn new(head: &'a [u8], info: Span) -> Self {
        let region = head.get(..info.end()).unwrap_or(&[]);
        Blocks {
            cur: Cursor::new(region, info.start()),
            end: region.len(),
        }
    }

    /// Advances to the next block with id `want`, skipping the others; returns its entry count.
    fn next_block(&mut self, want: u8) -> Option<u16> {
        while self.cur.pos() < self.end {
            match self.cur.u8().ok()? {
                info::PADDING => {}
                id if id == want => return self.cur.u16().ok(),
                info::KEY_VALUE => {
                    let n = self.cur.u16().ok()?;
                    for _ in 0..n {
                        let k = usize::from(self.cur.u16().ok()?);
                        self.cur.skip(k).ok()?;
                        let v = usize::from(self.cur.u16().ok()?);
                        self.cur.skip(v).ok()?;
                    }
                }
                info::INT_KEY_VALUE => {
                    let n = self.cur.u16().ok()?;
                    for _ in 0..n {
                        self.cur.skip(2).ok()?;
                        let v = usize::from(self.cur.u16().ok()?);
                        self.cur.skip(v).ok()?;
                    }
                }
                info::ACL_TOKEN => {
                    let n = usize::from(self.cur.u16().ok()?);
                    self.cur.skip(n).ok()?;
                }
                _ => return None,
            }
        }
        None
    }
}

/// Iterator over string key/values (see [`TTHeader::str_kvs`]).
pub struct StrKvs<'a> {
    blocks: Blocks<'a>,
    left: u16,
}

impl<'a> Iterator for StrKvs<'a> {
    type Item = (&'a [u8], &'a [u8]);

    fn next(&mut self) -> Option<Self::Item> {
        while self.left == 0 {
            self.left = self.blocks.next_block(info::KEY_VALUE)?;
        }
        self.left -= 1;
        let cur = &mut self.blocks.cur;
        let k = usize::from(cur.u16().ok()?);
        let key = cur.take(k).ok()?;
        let v = usize::from(cur.u16().ok()?);
        let value = cur.take(v).ok()?;
        Some((key, value))
    }
}

/// Iterator over int key/values (see [`TTHeader::int_kvs`]).
pub struct IntKvs<'a> {
    spans: IntKvSpans<'a>,
}

impl<'a> Iterator for IntKvs<'a> {
    type Item = (u16, &'a [u8]);

    fn next(&mut self) -> Option<Self::Item> {
        let (key, start, end) = self.spans.next()?;
        Some((key, self.spans.head.get(start..end)?))
    }
}

/// Int key/values as (key, value start, value end) offsets, for rewrites.
pub(crate) struct IntKvSpans<'a> {
    head: &'a [u8],
    blocks: Blocks<'a>,
    left: u16,
}

impl Iterator for IntKvSpans<'_> {
    type Item = (u16, usize, usize);

    fn next(&mut self) -> Option<Self::Item> {
        while self.left == 0 {
            self.left = self.blocks.next_block(info::INT_KEY_VALUE)?;
        }
        self.left -= 1;
        let cur = &mut self.blocks.cur;
        let key = cur.u16().ok()?;
        let v = usize::from(cur.u16().ok()?);
        let start = cur.pos();
        cur.skip(v).ok()?;
        Some((key, start, start + v))
    }
}

/// Builds a TTHeader (for replies, tests and rewrites that change the header's size).
#[derive(Debug, Clone, Default)]
pub struct TTHeaderBuilder<'a> {
    pub flags: u16,
    pub seqid: u32,
    pub protocol: Option<Protocol>,
    pub transforms: &'a [u8],
    pub str_kvs: Vec<(&'a [u8], &'a [u8])>,
    pub int_kvs: Vec<(u16, &'a [u8])>,
    pub acl_token: Option<&'a [u8]>,
    /// Write a Framed length before the message, as Volo expects.
    pub inner_framed: bool,
}

fn too_long(what: &'static str) -> CodecError {
    CodecError::Unencodable {
        what,
        reason: "longer than a u16 length allows",
    }
}

fn u16_len(n: usize, what: &'static str) -> Result<u16, CodecError> {
    u16::try_from(n).map_err(|_| too_long(what))
}

impl TTHeaderBuilder<'_> {
    /// Writes the TTHeader (and the inner Framed length if set) for a message of `message_len`
    /// bytes that the caller writes next.
    pub fn encode(&self, dst: &mut BytesMut, message_len: usize) -> Result<(), CodecError> {
        let mut info = BytesMut::new();
        if !self.str_kvs.is_empty() {
            info.put_u8(info::KEY_VALUE);
            info.put_u16(u16_len(self.str_kvs.len(), "string key/value count")?);
            for (k, v) in &self.str_kvs {
                info.put_u16(u16_len(k.len(), "string key")?);
                info.put_slice(k);
                info.put_u16(u16_len(v.len(), "string value")?);
                info.put_slice(v);
            }
        }
        if !self.int_kvs.is_empty() {
            info.put_u8(info::INT_KEY_VALUE);
            info.put_u16(u16_len(self.int_kvs.len(), "int key/value count")?);
            for (k, v) in &self.int_kvs {
                info.put_u16(*k);
                info.put_u16(u16_len(v.len(), "int value")?);
                info.put_slice(v);
            }
        }
        if let Some(token) = self.acl_token {
            info.put_u8(info::ACL_TOKEN);
            info.put_u16(u16_len(token.len(), "ACL token")?);
            info.put_slice(token);
        }
        let protocol = self.protocol.unwrap_or(Protocol::Binary);
        write_header(
            dst,
            self.flags,
            self.seqid,
            protocol.ttheader_id(),
            self.transforms,
            &info,
            self.inner_framed,
            message_len,
        )
    }
}

/// Writes a TTHeader around already-encoded info blocks, padding them to a 4-byte boundary.
#[allow(clippy::too_many_arguments)]
pub(crate) fn write_header(
    dst: &mut BytesMut,
    flags: u16,
    seqid: u32,
    protocol_id: u8,
    transforms: &[u8],
    info: &[u8],
    inner_framed: bool,
    message_len: usize,
) -> Result<(), CodecError> {
    let transform_count = u8::try_from(transforms.len()).map_err(|_| too_long("transform ids"))?;
    let unpadded = 2 + transforms.len() + info.len();
    let header_len = unpadded.div_ceil(4) * 4;
    let words = u16_len(header_len / 4, "header size")?;
    let inner = if inner_framed { 4 } else { 0 };
    let total = FIXED_LEN - 4 + header_len + inner + message_len;
    let length = u32::try_from(total).map_err(|_| too_long("frame length"))?;
    dst.reserve(FIXED_LEN + header_len + inner);
    dst.put_u32(length);
    dst.put_u16(TTHEADER_MAGIC);
    dst.put_u16(flags);
    dst.put_u32(seqid);
    dst.put_u16(words);
    dst.put_u8(protocol_id);
    dst.put_u8(transform_count);
    dst.put_slice(transforms);
    dst.put_slice(info);
    dst.put_bytes(0, header_len - unpadded);
    if inner_framed {
        let len = u32::try_from(message_len).map_err(|_| too_long("frame length"))?;
        dst.put_u32(len);
    }
    Ok(())
}

/// A call's `message` (an encoded Binary or Compact message; the header's protocol id says
/// which) in a TTHeader with an inner Framed length, as a Volo client sends it: ToService =
/// `to_service`, `isn` = `idl_service`, RPCTimeout = `rpc_timeout_ms` when given, and
/// `str_kvs` as further string keys. For callers that build calls themselves (the HTTP gateway,
/// `fnmesh call`, queue consumers).
pub fn wrap_call(
    seqid: u32,
    to_service: &str,
    idl_service: &str,
    rpc_timeout_ms: Option<u64>,
    str_kvs: &[(&str, &str)],
    message: &[u8],
) -> Result<bytes::BytesMut, CodecError> {
    let ms = rpc_timeout_ms.map(|t| t.max(1).to_string());
    let mut int_kvs: Vec<(u16, &[u8])> = vec![(int_key::TO_SERVICE, to_service.as_bytes())];
    if let Some(ms) = &ms {
        int_kvs.push((int_key::RPC_TIMEOUT, ms.as_bytes()));
    }
    let header = TTHeaderBuilder {
        seqid,
        str_kvs: std::iter::once((str_key::IDL_SERVICE_NAME, idl_service.as_bytes()))
            .chain(str_kvs.iter().map(|(k, v)| (k.as_bytes(), v.as_bytes())))
            .collect(),
        int_kvs,
        inner_framed: true,
        protocol: Some(match message.first() {
            Some(&crate::message::COMPACT_PROTOCOL_ID) => Protocol::Compact,
            _ => Protocol::Binary,
        }),
        ..TTHeaderBuilder::default()
    };
    let mut buf = bytes::BytesMut::with_capacity(message.len() + 64);
    header.encode(&mut buf, message.len())?;
    buf.extend_from_slice(message);
    Ok(buf)
}
