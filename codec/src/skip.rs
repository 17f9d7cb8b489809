//! Finds where an unframed message ends by walking its struct without decoding it: the only way
//! to delimit Thrift that has no length prefix. The walk is bounded in depth and, through the
//! caller's frame limit, in size; every element consumes at least one byte, so a hostile count
//! cannot make it loop longer than the input is.

use crate::{
    message::Protocol,
    wire::{Cursor, Stop, Walk},
    CodecError, Limits,
};

/// Walks the struct that starts at `start` and returns the offset just past its STOP byte, or
/// `Ok(None)` when `buf` ends before the struct does.
pub fn skip_struct(
    buf: &[u8],
    start: usize,
    protocol: Protocol,
    limits: &Limits,
) -> Result<Option<usize>, CodecError> {
    match walk_struct(buf, start, protocol, limits) {
        Ok(end) => Ok(Some(end)),
        Err(Stop::Incomplete(_)) => Ok(None),
        Err(Stop::Invalid(e)) => Err(e),
    }
}

/// The `type` (field 2, an i32) of the TApplicationException struct at the start of `buf`, or
/// `None` when the struct has no such field or is not well formed. Other fields are skipped
/// within `limits`.
pub fn exception_type(buf: &[u8], protocol: Protocol, limits: &Limits) -> Option<i32> {
    let mut cur = Cursor::new(buf, 0);
    match protocol {
        Protocol::Binary => {
            let b = Binary { limits };
            loop {
                let ty = cur.u8().ok()?;
                if ty == 0 {
                    return None;
                }
                let id = cur.u16().ok()?;
                if id == 2 && ty == 8 {
                    return Some(cur.u32().ok()? as i32);
                }
                b.skip_value(&mut cur, ty, 1).ok()?;
            }
        }
        Protocol::Compact => {
            let c = Compact { limits };
            let mut last: i64 = 0;
            loop {
                let header = cur.u8().ok()?;
                if header == 0 {
                    return None;
                }
                let ty = header & 0x0f;
                let id = match header >> 4 {
                    0 => {
                        let z = cur.varint(3, "compact field id").ok()?;
                        ((z >> 1) as i64) ^ -((z & 1) as i64)
                    }
                    delta => last + i64::from(delta),
                };
                last = id;
                if id == 2 && ty == 5 {
                    let z = cur.varint(5, "compact i32").ok()?;
                    return Some((((z >> 1) as i64) ^ -((z & 1) as i64)) as i32);
                }
                match ty {
                    1 | 2 => {}
                    _ => c.skip_value(&mut cur, ty, 1).ok()?,
                }
            }
        }
    }
}

pub(crate) fn walk_struct(
    buf: &[u8],
    start: usize,
    protocol: Protocol,
    limits: &Limits,
) -> Walk<usize> {
    let mut cur = Cursor::new(buf, start);
    match protocol {
        Protocol::Binary => Binary { limits }.skip_struct(&mut cur, 0)?,
        Protocol::Compact => Compact { limits }.skip_struct(&mut cur, 0)?,
    }
    Ok(cur.pos())
}

fn check_depth(depth: usize, at: usize, limits: &Limits) -> Walk<()> {
    if depth >= limits.max_depth {
        return Err(CodecError::LimitExceeded {
            what: "nesting depth",
            offset: at,
            value: depth as u64 + 1,
            limit: limits.max_depth as u64,
        }
        .into());
    }
    Ok(())
}

fn bad_type(what: &'static str, at: usize) -> Stop {
    CodecError::malformed(what, at, "unknown type id").into()
}

struct Binary<'l> {
    limits: &'l Limits,
}

impl Binary<'_> {
    fn skip_struct(&self, cur: &mut Cursor<'_>, depth: usize) -> Walk<()> {
        check_depth(depth, cur.pos(), self.limits)?;
        loop {
            let ty = cur.u8()?;
            if ty == 0 {
                return Ok(());
            }
            cur.skip(2)?; // field id
            self.skip_value(cur, ty, depth)?;
        }
    }

    fn fixed_width(ty: u8) -> Option<usize> {
        match ty {
            2 | 3 => Some(1),
            6 => Some(2),
            8 => Some(4),
            4 | 10 => Some(8),
            16 => Some(16),
            _ => None,
        }
    }

    fn size(cur: &mut Cursor<'_>) -> Walk<usize> {
        let at = cur.pos();
        let n = cur.u32()?;
        if n > i32::MAX as u32 {
            return Err(CodecError::malformed("binary container", at, "negative size").into());
        }
        Ok(n as usize)
    }

    fn skip_value(&self, cur: &mut Cursor<'_>, ty: u8, depth: usize) -> Walk<()> {
        if let Some(width) = Self::fixed_width(ty) {
            return cur.skip(width);
        }
        let at = cur.pos();
        match ty {
            11 => {
                let len = Self::size(cur)?;
                cur.skip(len)
            }
            12 => self.skip_struct(cur, depth + 1),
            13 => {
                let (k, v) = (cur.u8()?, cur.u8()?);
                let n = Self::size(cur)?;
                self.skip_elements(cur, &[k, v], n, depth + 1, at)
            }
            14 | 15 => {
                let e = cur.u8()?;
                let n = Self::size(cur)?;
                self.skip_elements(cur, &[e], n, depth + 1, at)
            }
            _ => Err(bad_type("binary field", at)),
        }
    }

    fn skip_elements(
        &self,
        cur: &mut Cursor<'_>,
        types: &[u8],
        n: usize,
        depth: usize,
        at: usize,
    ) -> Walk<()> {
        check_depth(depth, at, self.limits)?;
        let widths: Option<usize> = types.iter().map(|&t| Self::fixed_width(t)).sum();
        if let Some(width) = widths {
            let total = n.checked_mul(width).ok_or(Stop::Incomplete(usize::MAX))?;
            return cur.skip(total);
        }
        for _ in 0..n {
            for &t in types {
                self.skip_value(cur, t, depth)?;
            }
        }
        Ok(())
    }
}

struct Compact<'l> {
    limits: &'l Limits,
}

impl Compact<'_> {
    fn skip_struct(&self, cur: &mut Cursor<'_>, depth: usize) -> Walk<()> {
        check_depth(depth, cur.pos(), self.limits)?;
        loop {
            let header = cur.u8()?;
            if header == 0 {
                return Ok(());
            }
            let ty = header & 0x0f;
            if header >> 4 == 0 {
                cur.varint(3, "compact field id")?;
            }
            match ty {
                // Booleans carry their value in the field header.
                1 | 2 => {}
                _ => self.skip_value(cur, ty, depth)?,
            }
        }
    }

    fn size(cur: &mut Cursor<'_>) -> Walk<usize> {
        let at = cur.pos();
        let n = cur.varint(5, "compact container size")?;
        if n > i32::MAX as u64 {
            return Err(CodecError::malformed("compact container", at, "size is over 2^31").into());
        }
        Ok(n as usize)
    }

    fn skip_value(&self, cur: &mut Cursor<'_>, ty: u8, depth: usize) -> Walk<()> {
        let at = cur.pos();
        match ty {
            1..=3 => cur.skip(1),
            4 => cur.varint(3, "compact i16").map(drop),
            5 => cur.varint(5, "compact i32").map(drop),
            6 => cur.varint(10, "compact i64").map(drop),
            7 => cur.skip(8),
            8 => {
                let len = Self::size(cur)?;
                cur.skip(len)
            }
            9 | 10 => {
                let header = cur.u8()?;
                let e = header & 0x0f;
                let n = match header >> 4 {
                    15 => Self::size(cur)?,
                    short => usize::from(short),
                };
                self.skip_elements(cur, &[e], n, depth + 1, at)
            }
            11 => {
                let n = Self::size(cur)?;
                if n == 0 {
                    return Ok(());
                }
                let kv = cur.u8()?;
                self.skip_elements(cur, &[kv >> 4, kv & 0x0f], n, depth + 1, at)
            }
            12 => self.skip_struct(cur, depth + 1),
            13 => cur.skip(16),
            _ => Err(bad_type("compact field", at)),
        }
    }

    fn skip_elements(
        &self,
        cur: &mut Cursor<'_>,
        types: &[u8],
        n: usize,
        depth: usize,
        at: usize,
    ) -> Walk<()> {
        check_depth(depth, at, self.limits)?;
        if types.iter().any(|t| !(1..=13).contains(t)) {
            return Err(bad_type("compact container element", at));
        }
        for _ in 0..n {
            for &t in types {
                self.skip_value(cur, t, depth)?;
            }
        }
        Ok(())
    }
}
