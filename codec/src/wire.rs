//! Checked big-endian and varint reads over a byte slice. A read past the end reports how many
//! bytes the walk needed in total, so a streaming caller can wait for them instead of re-walking.

use crate::CodecError;

/// Why a walk over a partial buffer stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Stop {
    /// The input ends too soon; at least this many bytes (from the walk's start) are needed.
    Incomplete(usize),
    /// The input is wrong, whatever follows.
    Invalid(CodecError),
}

impl From<CodecError> for Stop {
    fn from(e: CodecError) -> Self {
        Stop::Invalid(e)
    }
}

pub(crate) type Walk<T> = Result<T, Stop>;

/// A cursor over a byte slice whose reads never panic.
#[derive(Debug, Clone)]
pub(crate) struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    pub(crate) fn new(buf: &'a [u8], pos: usize) -> Self {
        Cursor { buf, pos }
    }

    pub(crate) fn pos(&self) -> usize {
        self.pos
    }

    pub(crate) fn take(&mut self, n: usize) -> Walk<&'a [u8]> {
        let end = self
            .pos
            .checked_add(n)
            .ok_or(Stop::Incomplete(usize::MAX))?;
        let bytes = self.buf.get(self.pos..end).ok_or(Stop::Incomplete(end))?;
        self.pos = end;
        Ok(bytes)
    }

    pub(crate) fn skip(&mut self, n: usize) -> Walk<()> {
        self.take(n).map(|_| ())
    }

    pub(crate) fn u8(&mut self) -> Walk<u8> {
        Ok(self.take(1)?[0])
    }

    pub(crate) fn u16(&mut self) -> Walk<u16> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    pub(crate) fn u32(&mut self) -> Walk<u32> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    /// An unsigned LEB128 varint of at most `max_bytes` bytes (5 for 32-bit, 10 for 64-bit).
    pub(crate) fn varint(&mut self, max_bytes: usize, what: &'static str) -> Walk<u64> {
        let start = self.pos;
        let mut value = 0u64;
        for i in 0..max_bytes {
            let b = self.u8()?;
            value |= u64::from(b & 0x7f) << (7 * i);
            if b & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err(CodecError::malformed(what, start, "varint is too long").into())
    }
}

/// Writes `value` as a varint into exactly `width` bytes (padding with continuation bytes when the
/// value is short), which lets a compact seqid be rewritten without moving anything. Returns false
/// when the value does not fit.
pub(crate) fn put_varint_fixed(dst: &mut [u8], mut value: u32) -> bool {
    let width = dst.len();
    for (i, slot) in dst.iter_mut().enumerate() {
        let last = i + 1 == width;
        let low = (value & 0x7f) as u8;
        value >>= 7;
        *slot = if last { low } else { low | 0x80 };
    }
    value == 0 && width <= 5
}

pub(crate) fn put_varint(dst: &mut bytes::BytesMut, mut value: u64) {
    use bytes::BufMut;
    while value >= 0x80 {
        dst.put_u8((value as u8) | 0x80);
        value >>= 7;
    }
    dst.put_u8(value as u8);
}

pub(crate) fn zigzag32(v: i32) -> u64 {
    u64::from(((v << 1) ^ (v >> 31)) as u32)
}
