//! Finds where an unframed message ends by walking its struct without decoding it: the only way
//! to delimit Thrift that has no length prefix. The walk keeps its place in an explicit stack, so
//! a message that arrives a byte at a time is walked once, not again from its start on every read
//! (which let a caller that drips bytes cost quadratic CPU). It is bounded in depth and, through
//! the caller's frame limit, in size; every element consumes at least one byte, so a hostile
//! count cannot make it loop longer than the input is.

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
    match Walker::new(start).resume(buf, protocol, limits) {
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
    fn skip<'a>(
        buf: &'a [u8],
        cur: &mut Cursor<'a>,
        ty: u8,
        p: Protocol,
        l: &Limits,
    ) -> Option<()> {
        let end = Walker::value(ty, cur.pos()).resume(buf, p, l).ok()?;
        *cur = Cursor::new(buf, end);
        Some(())
    }
    let mut last: i64 = 0;
    loop {
        let (ty, id) = match protocol {
            Protocol::Binary => {
                let ty = cur.u8().ok()?;
                if ty == 0 {
                    return None;
                }
                (ty, i64::from(cur.u16().ok()?))
            }
            Protocol::Compact => {
                let header = cur.u8().ok()?;
                if header == 0 {
                    return None;
                }
                let id = match header >> 4 {
                    0 => zigzag(cur.varint(3, "compact field id").ok()?),
                    delta => last + i64::from(delta),
                };
                last = id;
                (header & 0x0f, id)
            }
        };
        match (protocol, ty) {
            (Protocol::Binary, 8) if id == 2 => return Some(cur.u32().ok()? as i32),
            (Protocol::Compact, 5) if id == 2 => {
                return Some(zigzag(cur.varint(5, "compact i32").ok()?) as i32)
            }
            // Compact booleans carry their value in the field header.
            (Protocol::Compact, 1 | 2) => {}
            _ => skip(buf, &mut cur, ty, protocol, limits)?,
        }
    }
}

fn zigzag(z: u64) -> i64 {
    ((z >> 1) as i64) ^ -((z & 1) as i64)
}

/// What the walk is inside of.
#[derive(Debug, Clone, Copy)]
enum Level {
    /// A struct: next comes a field header or STOP.
    Struct,
    /// `left` more values of a container: all of `types[0]` (`map = false`), or keys of
    /// `types[0]` and values of `types[1]` in turn (`map`, `left` counting both).
    Values {
        types: [u8; 2],
        map: bool,
        left: usize,
    },
}

/// A walk over one struct (or value), resumable where the input ran out: call
/// [`Walker::resume`] again with the same buffer, grown. Each step reads one field header, one
/// value or one container header whole, or leaves its place untouched.
#[derive(Debug, Clone, Default)]
pub(crate) struct Walker {
    stack: Vec<Level>,
    /// The offset of the next unread byte.
    pos: usize,
}

impl Walker {
    /// A walk of the struct at `start`.
    pub(crate) fn new(start: usize) -> Walker {
        Walker {
            stack: vec![Level::Struct],
            pos: start,
        }
    }

    /// A walk of one value of type `ty` at `start`.
    fn value(ty: u8, start: usize) -> Walker {
        Walker {
            stack: vec![Level::Values {
                types: [ty, ty],
                map: false,
                left: 1,
            }],
            pos: start,
        }
    }

    /// Walks on until the struct ends (its end offset) or `buf` does
    /// ([`Stop::Incomplete`] with the length the next step needs; the place is kept).
    pub(crate) fn resume(
        &mut self,
        buf: &[u8],
        protocol: Protocol,
        limits: &Limits,
    ) -> Walk<usize> {
        while !self.stack.is_empty() {
            let mut cur = Cursor::new(buf, self.pos);
            let next = match protocol {
                Protocol::Binary => self.step::<Binary>(&mut cur, limits)?,
                Protocol::Compact => self.step::<Compact>(&mut cur, limits)?,
            };
            self.pos = cur.pos();
            if let Some(level) = next {
                check_depth(self.stack.len(), self.pos, limits)?;
                self.stack.push(level);
            }
        }
        Ok(self.pos)
    }

    /// One step from the top of the stack; what to push after it. Nothing is changed unless it
    /// succeeds (the cursor is the caller's to commit).
    fn step<P: Wire>(&mut self, cur: &mut Cursor<'_>, limits: &Limits) -> Walk<Option<Level>> {
        let Some(top) = self.stack.last_mut() else {
            return Ok(None);
        };
        match top {
            Level::Struct => match P::field(cur)? {
                None => {
                    self.stack.pop();
                    Ok(None)
                }
                Some(ty) => P::value(cur, ty, limits),
            },
            Level::Values { left: 0, .. } => {
                self.stack.pop();
                Ok(None)
            }
            Level::Values { types, map, left } => {
                let ty = if *map && *left % 2 == 1 {
                    types[1]
                } else {
                    types[0]
                };
                let next = P::value(cur, ty, limits)?;
                *left -= 1;
                Ok(next)
            }
        }
    }
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

/// One protocol's encoding of field headers and values.
trait Wire {
    /// The next field's type, having read its header; `None` at STOP. A type whose value lives
    /// in the header (a compact boolean) comes back as a one with nothing to read.
    fn field(cur: &mut Cursor<'_>) -> Walk<Option<u8>>;
    /// Reads a value of type `ty` whole, or the header of a struct or container whose contents
    /// come next (the level to push).
    fn value(cur: &mut Cursor<'_>, ty: u8, limits: &Limits) -> Walk<Option<Level>>;
}

/// `n` values of `types` (a map's key and value types when `map`): skipped at once when each has
/// a fixed width, else a level to walk.
fn container(
    cur: &mut Cursor<'_>,
    types: [u8; 2],
    map: bool,
    n: usize,
    width: fn(u8) -> Option<usize>,
) -> Walk<Option<Level>> {
    let widths = if map {
        width(types[0]).zip(width(types[1])).map(|(k, v)| k + v)
    } else {
        width(types[0])
    };
    if let Some(w) = widths {
        let total = n.checked_mul(w).ok_or(Stop::Incomplete(usize::MAX))?;
        cur.skip(total)?;
        return Ok(None);
    }
    let left = if map { n * 2 } else { n };
    Ok((left > 0).then_some(Level::Values { types, map, left }))
}

struct Binary;

impl Binary {
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
}

impl Wire for Binary {
    fn field(cur: &mut Cursor<'_>) -> Walk<Option<u8>> {
        let ty = cur.u8()?;
        if ty == 0 {
            return Ok(None);
        }
        cur.skip(2)?; // field id
        Ok(Some(ty))
    }

    fn value(cur: &mut Cursor<'_>, ty: u8, _: &Limits) -> Walk<Option<Level>> {
        if let Some(width) = Self::fixed_width(ty) {
            cur.skip(width)?;
            return Ok(None);
        }
        let at = cur.pos();
        match ty {
            11 => {
                let len = Self::size(cur)?;
                cur.skip(len)?;
                Ok(None)
            }
            12 => Ok(Some(Level::Struct)),
            13 => {
                let (k, v) = (cur.u8()?, cur.u8()?);
                let n = Self::size(cur)?;
                container(cur, [k, v], true, n, Self::fixed_width)
            }
            14 | 15 => {
                let e = cur.u8()?;
                let n = Self::size(cur)?;
                container(cur, [e, e], false, n, Self::fixed_width)
            }
            _ => Err(bad_type("binary field", at)),
        }
    }
}

struct Compact;

impl Compact {
    fn fixed_width(ty: u8) -> Option<usize> {
        match ty {
            1..=3 => Some(1),
            7 => Some(8),
            13 => Some(16),
            _ => None,
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
}

impl Wire for Compact {
    fn field(cur: &mut Cursor<'_>) -> Walk<Option<u8>> {
        let header = cur.u8()?;
        if header == 0 {
            return Ok(None);
        }
        if header >> 4 == 0 {
            cur.varint(3, "compact field id")?;
        }
        // Booleans carry their value in the field header: a value with nothing left to read.
        Ok(Some(match header & 0x0f {
            1 | 2 => 0,
            ty => ty,
        }))
    }

    fn value(cur: &mut Cursor<'_>, ty: u8, _: &Limits) -> Walk<Option<Level>> {
        let at = cur.pos();
        match ty {
            0 => {} // a boolean field, already read with its header
            1..=3 => cur.skip(1)?,
            4 => _ = cur.varint(3, "compact i16")?,
            5 => _ = cur.varint(5, "compact i32")?,
            6 => _ = cur.varint(10, "compact i64")?,
            7 => cur.skip(8)?,
            8 => {
                let len = Self::size(cur)?;
                cur.skip(len)?;
            }
            9 | 10 => {
                let header = cur.u8()?;
                let e = header & 0x0f;
                let n = match header >> 4 {
                    15 => Self::size(cur)?,
                    short => usize::from(short),
                };
                if !(1..=13).contains(&e) {
                    return Err(bad_type("compact container element", at));
                }
                return container(cur, [e, e], false, n, Self::fixed_width);
            }
            11 => {
                let n = Self::size(cur)?;
                if n == 0 {
                    return Ok(None);
                }
                let kv = cur.u8()?;
                let (k, v) = (kv >> 4, kv & 0x0f);
                if !(1..=13).contains(&k) || !(1..=13).contains(&v) {
                    return Err(bad_type("compact container element", at));
                }
                return container(cur, [k, v], true, n, Self::fixed_width);
            }
            12 => return Ok(Some(Level::Struct)),
            13 => cur.skip(16)?,
            _ => return Err(bad_type("compact field", at)),
        }
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A binary struct holding a list of `n` empty structs: one byte per element.
    fn list_of_empty_structs(n: u32) -> Vec<u8> {
        let mut m = vec![15, 0, 1, 12];
        m.extend_from_slice(&n.to_be_bytes());
        m.extend(std::iter::repeat_n(0u8, n as usize));
        m.push(0);
        m
    }

    #[test]
    fn a_message_dripped_a_byte_at_a_time_is_walked_once() {
        let m = list_of_empty_structs(10_000);
        let limits = Limits::default();
        let mut w = Walker::new(0);
        for len in 1..m.len() {
            match w.resume(&m[..len], Protocol::Binary, &limits) {
                Err(Stop::Incomplete(need)) => assert!(need > len),
                other => panic!("at {len}: {other:?}"),
            }
            // It keeps its place within one step (a list header: 8 bytes) of the input's end,
            // so the next read resumes there: the whole walk costs one pass.
            assert!(len - w.pos < 8, "at {len} its place is {}", w.pos);
        }
        assert_eq!(w.resume(&m, Protocol::Binary, &limits), Ok(m.len()));
    }

    #[test]
    fn a_resumed_walk_finds_the_same_end_as_a_whole_one() {
        // Compact: a struct with a bool field, a map<string, list<i32>> and a nested struct.
        let m: Vec<u8> = vec![
            0x11, // field 1, bool true
            0x1b, 0x01, 0x89, // field 2, map of 1: string -> list
            0x01, b'k', // key "k"
            0x25, 0x02, 0x04, // list of 2 i32: 1, 2
            0x1c, 0x15, 0x06, 0x00, // field 3, struct { field 1 i32 3 }
            0x00,
        ];
        let limits = Limits::default();
        let whole = skip_struct(&m, 0, Protocol::Compact, &limits).unwrap();
        assert_eq!(whole, Some(m.len()));
        for cut in 0..m.len() {
            let mut w = Walker::new(0);
            assert!(matches!(
                w.resume(&m[..cut], Protocol::Compact, &limits),
                Err(Stop::Incomplete(_))
            ));
            assert_eq!(
                w.resume(&m, Protocol::Compact, &limits),
                Ok(m.len()),
                "cut {cut}"
            );
        }
    }
}
