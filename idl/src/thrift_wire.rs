//! Thrift's Binary and Compact protocols, value by value, for the JSON codec (thrift_json):
//! written here because the codec walks an IDL read at run time, which no protocol crate does.
//! Types are named by their Binary ids whichever protocol is on the wire; Compact's field-id
//! deltas, zigzag varints and bools carried in field headers stay inside this module.

use crate::thrift_json::DecodeError;

pub(crate) const T_STOP: u8 = 0;
pub(crate) const T_BOOL: u8 = 2;
pub(crate) const T_BYTE: u8 = 3;
pub(crate) const T_DOUBLE: u8 = 4;
pub(crate) const T_I16: u8 = 6;
pub(crate) const T_I32: u8 = 8;
pub(crate) const T_I64: u8 = 10;
pub(crate) const T_STRING: u8 = 11;
pub(crate) const T_STRUCT: u8 = 12;
pub(crate) const T_MAP: u8 = 13;
pub(crate) const T_SET: u8 = 14;
pub(crate) const T_LIST: u8 = 15;
pub(crate) const T_UUID: u8 = 16;

const COMPACT_ID: u8 = 0x82;
const COMPACT_VERSION: u8 = 1;
const CT_TRUE: u8 = 1;
const CT_FALSE: u8 = 2;

/// Which Thrift protocol a message is in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Protocol {
    /// TBinaryProtocol, strict messages (what Kitex and Volo send by default).
    #[default]
    Binary,
    /// TCompactProtocol.
    Compact,
}

impl Protocol {
    /// The protocol a message is in, from its first byte.
    pub fn of_message(message: &[u8]) -> Protocol {
        match message.first() {
            Some(&COMPACT_ID) => Protocol::Compact,
            _ => Protocol::Binary,
        }
    }
}

/// Compact's type id for a Binary type id (bools as `true`: their value rides elsewhere).
fn compact_type(t: u8) -> u8 {
    match t {
        T_BOOL => CT_TRUE,
        T_BYTE => 3,
        T_I16 => 4,
        T_I32 => 5,
        T_I64 => 6,
        T_DOUBLE => 7,
        T_STRING => 8,
        T_LIST => 9,
        T_SET => 10,
        T_MAP => 11,
        T_STRUCT => 12,
        T_UUID => 13,
        _ => 0,
    }
}

/// The Binary type id for a Compact one (both bool ids are `T_BOOL`); `None` if unknown.
fn binary_type(ct: u8) -> Option<u8> {
    Some(match ct {
        CT_TRUE | CT_FALSE => T_BOOL,
        3 => T_BYTE,
        4 => T_I16,
        5 => T_I32,
        6 => T_I64,
        7 => T_DOUBLE,
        8 => T_STRING,
        9 => T_LIST,
        10 => T_SET,
        11 => T_MAP,
        12 => T_STRUCT,
        13 => T_UUID,
        _ => return None,
    })
}

fn zigzag(n: i64) -> u64 {
    ((n << 1) ^ (n >> 63)) as u64
}

/// A message being written.
pub(crate) struct Out {
    pub proto: Protocol,
    pub buf: Vec<u8>,
    last_id: i16,
}

impl Out {
    pub fn new(proto: Protocol, capacity: usize) -> Out {
        Out {
            proto,
            buf: Vec::with_capacity(capacity),
            last_id: 0,
        }
    }

    fn varint(&mut self, mut v: u64) {
        while v >= 0x80 {
            self.buf.push((v as u8) | 0x80);
            v >>= 7;
        }
        self.buf.push(v as u8);
    }

    /// A message header: `kind` 1 CALL, 2 REPLY, 3 EXCEPTION, 4 ONEWAY.
    pub fn message(&mut self, kind: u8, name: &str, seqid: i32) {
        match self.proto {
            Protocol::Binary => {
                self.buf
                    .extend_from_slice(&(0x8001_0000u32 | u32::from(kind)).to_be_bytes());
                self.bytes(name.as_bytes());
                self.buf.extend_from_slice(&seqid.to_be_bytes());
            }
            Protocol::Compact => {
                self.buf.push(COMPACT_ID);
                self.buf.push((kind << 5) | COMPACT_VERSION);
                self.varint(u64::from(seqid as u32));
                self.bytes(name.as_bytes());
            }
        }
    }

    /// Starts a struct; pass what it returns to [`Out::struct_end`].
    pub fn struct_begin(&mut self) -> i16 {
        std::mem::replace(&mut self.last_id, 0)
    }

    pub fn struct_end(&mut self, outer: i16) {
        self.buf.push(T_STOP);
        self.last_id = outer;
    }

    /// A field header for a value of type `t` written next (bools: [`Out::bool_field`]).
    pub fn field(&mut self, t: u8, id: i16) {
        match self.proto {
            Protocol::Binary => {
                self.buf.push(t);
                self.buf.extend_from_slice(&id.to_be_bytes());
            }
            Protocol::Compact => self.compact_field(compact_type(t), id),
        }
    }

    fn compact_field(&mut self, ct: u8, id: i16) {
        let delta = i32::from(id) - i32::from(self.last_id);
        if (1..=15).contains(&delta) {
            self.buf.push(((delta as u8) << 4) | ct);
        } else {
            self.buf.push(ct);
            self.varint(zigzag(id.into()));
        }
        self.last_id = id;
    }

    /// A bool field, header and value.
    pub fn bool_field(&mut self, id: i16, b: bool) {
        match self.proto {
            Protocol::Binary => {
                self.field(T_BOOL, id);
                self.bool(b);
            }
            Protocol::Compact => self.compact_field(if b { CT_TRUE } else { CT_FALSE }, id),
        }
    }

    /// A bool outside a field header (in a container).
    pub fn bool(&mut self, b: bool) {
        self.buf.push(match (self.proto, b) {
            (Protocol::Binary, b) => u8::from(b),
            (Protocol::Compact, true) => CT_TRUE,
            (Protocol::Compact, false) => CT_FALSE,
        });
    }

    pub fn i8(&mut self, n: i8) {
        self.buf.push(n as u8);
    }

    pub fn i16(&mut self, n: i16) {
        match self.proto {
            Protocol::Binary => self.buf.extend_from_slice(&n.to_be_bytes()),
            Protocol::Compact => self.varint(zigzag(n.into())),
        }
    }

    pub fn i32(&mut self, n: i32) {
        match self.proto {
            Protocol::Binary => self.buf.extend_from_slice(&n.to_be_bytes()),
            Protocol::Compact => self.varint(zigzag(n.into())),
        }
    }

    pub fn i64(&mut self, n: i64) {
        match self.proto {
            Protocol::Binary => self.buf.extend_from_slice(&n.to_be_bytes()),
            Protocol::Compact => self.varint(zigzag(n)),
        }
    }

    pub fn double(&mut self, x: f64) {
        match self.proto {
            Protocol::Binary => self.buf.extend_from_slice(&x.to_bits().to_be_bytes()),
            Protocol::Compact => self.buf.extend_from_slice(&x.to_bits().to_le_bytes()),
        }
    }

    fn len(&mut self, n: usize) {
        match self.proto {
            Protocol::Binary => self.buf.extend_from_slice(&(n as i32).to_be_bytes()),
            Protocol::Compact => self.varint(n as u64),
        }
    }

    pub fn bytes(&mut self, b: &[u8]) {
        self.len(b.len());
        self.buf.extend_from_slice(b);
    }

    pub fn uuid(&mut self, b: &[u8; 16]) {
        self.buf.extend_from_slice(b);
    }

    /// A list or set header: element type and count.
    pub fn list(&mut self, elem: u8, n: usize) {
        match self.proto {
            Protocol::Binary => {
                self.buf.push(elem);
                self.len(n);
            }
            Protocol::Compact if n < 15 => self.buf.push(((n as u8) << 4) | compact_type(elem)),
            Protocol::Compact => {
                self.buf.push(0xf0 | compact_type(elem));
                self.varint(n as u64);
            }
        }
    }

    /// A map header: key and value types and count.
    pub fn map(&mut self, k: u8, v: u8, n: usize) {
        match self.proto {
            Protocol::Binary => {
                self.buf.push(k);
                self.buf.push(v);
                self.len(n);
            }
            Protocol::Compact if n == 0 => self.buf.push(0),
            Protocol::Compact => {
                self.varint(n as u64);
                self.buf.push((compact_type(k) << 4) | compact_type(v));
            }
        }
    }
}

/// A message being read.
pub(crate) struct In<'b> {
    proto: Protocol,
    buf: &'b [u8],
    at: usize,
    last_id: i16,
    /// A Compact bool field's value, read with its header.
    bool_field: Option<bool>,
}

fn bad<T>(what: impl Into<String>) -> Result<T, DecodeError> {
    Err(DecodeError(what.into()))
}

impl<'b> In<'b> {
    pub fn new(proto: Protocol, buf: &'b [u8]) -> In<'b> {
        In {
            proto,
            buf,
            at: 0,
            last_id: 0,
            bool_field: None,
        }
    }

    fn take(&mut self, n: usize) -> Result<&'b [u8], DecodeError> {
        let end = self
            .at
            .checked_add(n)
            .filter(|e| *e <= self.buf.len())
            .ok_or_else(|| DecodeError(format!("ends early at byte {}", self.at)))?;
        let bytes = &self.buf[self.at..end];
        self.at = end;
        Ok(bytes)
    }

    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        Ok(self.take(N)?.try_into().unwrap_or([0; N]))
    }

    fn varint(&mut self, max_bytes: usize) -> Result<u64, DecodeError> {
        let mut v = 0u64;
        for i in 0..max_bytes {
            let b = self.u8()?;
            v |= u64::from(b & 0x7f) << (7 * i);
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        bad(format!(
            "varint longer than {max_bytes} bytes at {}",
            self.at
        ))
    }

    fn zigzag(&mut self) -> Result<i64, DecodeError> {
        let v = self.varint(10)?;
        Ok(((v >> 1) as i64) ^ -((v & 1) as i64))
    }

    /// A message header; its type (2 REPLY, 3 EXCEPTION, ...).
    pub fn message(&mut self) -> Result<u8, DecodeError> {
        match self.proto {
            Protocol::Compact => {
                let [_, tv] = self.array::<2>()?;
                if tv & 0x1f != COMPACT_VERSION {
                    return bad(format!("bad compact version {}", tv & 0x1f));
                }
                self.varint(5)?; // seqid
                self.bytes()?;
                Ok(tv >> 5)
            }
            Protocol::Binary => {
                let first = i32::from_be_bytes(self.array()?);
                let kind = if first < 0 {
                    let version = (first as u32) & 0xffff_0000;
                    if version != 0x8001_0000 {
                        return bad(format!("bad version {version:#x}"));
                    }
                    self.bytes()?;
                    (first & 0xff) as u8
                } else {
                    self.take(first as usize)?;
                    self.u8()?
                };
                self.take(4)?; // seqid
                Ok(kind)
            }
        }
    }

    /// Starts a struct; pass what it returns to [`In::struct_end`].
    pub fn struct_begin(&mut self) -> i16 {
        std::mem::replace(&mut self.last_id, 0)
    }

    pub fn struct_end(&mut self, outer: i16) {
        self.last_id = outer;
    }

    /// The next field's type and id, or `None` at the struct's end.
    pub fn field(&mut self) -> Result<Option<(u8, i16)>, DecodeError> {
        let b = self.u8()?;
        if b == T_STOP {
            return Ok(None);
        }
        match self.proto {
            Protocol::Binary => Ok(Some((b, i16::from_be_bytes(self.array()?)))),
            Protocol::Compact => {
                let ct = b & 0x0f;
                let Some(t) = binary_type(ct) else {
                    return bad(format!("unknown compact type {ct}"));
                };
                let id = match b >> 4 {
                    0 => i16::try_from(self.zigzag()?).or_else(|_| bad("field id out of range"))?,
                    delta => self.last_id.wrapping_add(delta.into()),
                };
                self.last_id = id;
                if t == T_BOOL {
                    self.bool_field = Some(ct == CT_TRUE);
                }
                Ok(Some((t, id)))
            }
        }
    }

    pub fn bool(&mut self) -> Result<bool, DecodeError> {
        if let Some(b) = self.bool_field.take() {
            return Ok(b);
        }
        let b = self.u8()?;
        Ok(match self.proto {
            Protocol::Binary => b != 0,
            Protocol::Compact => b == CT_TRUE,
        })
    }

    pub fn i8(&mut self) -> Result<i8, DecodeError> {
        Ok(self.u8()? as i8)
    }

    fn int(&mut self, lo: i64, hi: i64) -> Result<i64, DecodeError> {
        let n = self.zigzag()?;
        match (lo..=hi).contains(&n) {
            true => Ok(n),
            false => bad(format!("integer {n} out of range at {}", self.at)),
        }
    }

    pub fn i16(&mut self) -> Result<i16, DecodeError> {
        match self.proto {
            Protocol::Binary => Ok(i16::from_be_bytes(self.array()?)),
            Protocol::Compact => Ok(self.int(i16::MIN.into(), i16::MAX.into())? as i16),
        }
    }

    pub fn i32(&mut self) -> Result<i32, DecodeError> {
        match self.proto {
            Protocol::Binary => Ok(i32::from_be_bytes(self.array()?)),
            Protocol::Compact => Ok(self.int(i32::MIN.into(), i32::MAX.into())? as i32),
        }
    }

    pub fn i64(&mut self) -> Result<i64, DecodeError> {
        match self.proto {
            Protocol::Binary => Ok(i64::from_be_bytes(self.array()?)),
            Protocol::Compact => self.zigzag(),
        }
    }

    pub fn double(&mut self) -> Result<f64, DecodeError> {
        let b = self.array::<8>()?;
        Ok(f64::from_bits(match self.proto {
            Protocol::Binary => u64::from_be_bytes(b),
            Protocol::Compact => u64::from_le_bytes(b),
        }))
    }

    /// A length or count: never more than the bytes left, since every item takes one at least.
    fn len(&mut self) -> Result<usize, DecodeError> {
        let n = match self.proto {
            Protocol::Binary => i64::from(i32::from_be_bytes(self.array()?)),
            Protocol::Compact => self.varint(5)? as i64,
        };
        usize::try_from(n)
            .ok()
            .filter(|n| *n <= self.buf.len() - self.at)
            .ok_or_else(|| DecodeError(format!("bad length {n}")))
    }

    pub fn bytes(&mut self) -> Result<&'b [u8], DecodeError> {
        let n = self.len()?;
        self.take(n)
    }

    pub fn uuid(&mut self) -> Result<[u8; 16], DecodeError> {
        self.array()
    }

    /// A list or set header: element type and count.
    pub fn list(&mut self) -> Result<(u8, usize), DecodeError> {
        match self.proto {
            Protocol::Binary => Ok((self.u8()?, self.len()?)),
            Protocol::Compact => {
                let b = self.u8()?;
                let t = binary_type(b & 0x0f)
                    .ok_or_else(|| DecodeError(format!("unknown compact type {}", b & 0x0f)))?;
                let n = match b >> 4 {
                    15 => self.len()?,
                    n => usize::from(n),
                };
                Ok((t, n))
            }
        }
    }

    /// A map header: key and value types and count.
    pub fn map(&mut self) -> Result<(u8, u8, usize), DecodeError> {
        match self.proto {
            Protocol::Binary => Ok((self.u8()?, self.u8()?, self.len()?)),
            Protocol::Compact => {
                let n = self.len()?;
                if n == 0 {
                    return Ok((0, 0, 0));
                }
                let kv = self.u8()?;
                let (Some(k), Some(v)) = (binary_type(kv >> 4), binary_type(kv & 0x0f)) else {
                    return bad(format!("unknown compact map types {kv:#x}"));
                };
                Ok((k, v, n))
            }
        }
    }
}
