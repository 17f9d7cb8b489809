//! HPACK (RFC 7541), the header compression of HTTP/2, for a relay: a decoder that hands each
//! field of a header block to the caller as borrowed bytes, and a stateless encoder.
//!
//! The decoder keeps the peer's dynamic table and enforces the limits a relay announces (table
//! size, header list size); no input makes it panic or allocate more than those limits allow.
//! The encoder never adds to the peer's dynamic table: it sends static-table indexes and literals
//! "without indexing", so a relay's header blocks cost it no table state per peer and can be
//! written in any order on any connection.

mod huffman;
mod table;

pub use table::ENTRY_OVERHEAD;
use table::{static_name, static_pair, Dynamic, STATIC};

/// Why a header block was refused: a COMPRESSION_ERROR for the connection (RFC 7540 4.3), except
/// [`HpackError::ListTooLarge`], which refuses one stream.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HpackError {
    #[error("header block truncated")]
    Truncated,
    #[error("HPACK integer too large")]
    IntegerOverflow,
    #[error("HPACK index {0} is not in the tables")]
    BadIndex(usize),
    #[error("bad Huffman string: {0}")]
    BadHuffman(&'static str),
    #[error("dynamic table size update to {size} over the limit of {limit}")]
    TableSizeOverLimit { size: usize, limit: usize },
    #[error("dynamic table size update after the first field of a block")]
    LateTableSizeUpdate,
    #[error("header list over {limit} bytes")]
    ListTooLarge { limit: usize },
}

/// One decoded header field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Field<'a> {
    pub name: &'a [u8],
    pub value: &'a [u8],
    /// Sent as "never indexed" (RFC 7541 6.2.3): a relay must forward it the same way.
    pub sensitive: bool,
    /// Valid HTTP/2 field text (RFC 9113 8.2.1): a name of lowercase visible characters (a colon
    /// only first), a value without NUL, CR or LF and without whitespace at either end. A field
    /// that is not makes its message malformed: an error of its stream, not of the connection.
    /// Checked once per literal (a field from the static table is valid; one from the dynamic
    /// table is as valid as when it was added).
    pub valid: bool,
}

/// RFC 9113 8.2.1: a field name holds no character in 0x00-0x20, 0x41-0x5a (uppercase) or
/// 0x7f-0xff, and a colon only as a pseudo-header's first character.
fn name_ok(name: &[u8]) -> bool {
    let Some((first, rest)) = name.split_first() else {
        return false;
    };
    let plain = |b: &u8| matches!(b, 0x21..=0x40 | 0x5b..=0x7e) && *b != b':';
    (plain(first) || *first == b':') && rest.iter().all(plain)
}

/// RFC 9113 8.2.1: a field value holds no NUL, CR or LF, and starts and ends with no space or tab.
fn value_ok(value: &[u8]) -> bool {
    let edge = |b: Option<&u8>| matches!(b, Some(b' ' | b'\t'));
    !edge(value.first())
        && !edge(value.last())
        && !value.iter().any(|b| matches!(b, 0 | b'\r' | b'\n'))
}

/// The default size of a dynamic table, before SETTINGS_HEADER_TABLE_SIZE says otherwise.
pub const DEFAULT_TABLE_SIZE: usize = 4096;

/// Decodes the header blocks one peer sends on one connection, in order.
pub struct Decoder {
    table: Dynamic,
    /// The largest table the peer may ask for: the SETTINGS_HEADER_TABLE_SIZE we announced.
    limit: usize,
    /// The largest header list accepted (SETTINGS_MAX_HEADER_LIST_SIZE's unit: name + value + 32
    /// per field).
    max_list: usize,
    /// Huffman-decoded strings of the field being decoded.
    scratch: Vec<u8>,
}

/// A string literal of the field being decoded: in the block, or decoded into the scratch buffer.
#[derive(Clone, Copy)]
enum Text<'a> {
    Raw(&'a [u8]),
    Decoded(usize, usize),
}

impl Decoder {
    /// A decoder for a peer that may use a table of up to `table_limit` and may send header lists
    /// of up to `max_list`.
    pub fn new(table_limit: usize, max_list: usize) -> Decoder {
        Decoder {
            table: Dynamic::new(table_limit),
            limit: table_limit,
            max_list,
            scratch: Vec::new(),
        }
    }

    /// The table's current size (RFC 7541 4.1 units).
    pub fn table_size(&self) -> usize {
        self.table.size()
    }

    /// Entries in the dynamic table.
    pub fn table_len(&self) -> usize {
        self.table.len()
    }

    /// Decodes one complete header block (HEADERS and its CONTINUATIONs, joined), handing each
    /// field to `field` in order. After an error the connection's table is out of step with the
    /// peer's and the connection must end (COMPRESSION_ERROR), except after
    /// [`HpackError::ListTooLarge`], which is raised only once the whole block was decoded.
    pub fn decode(
        &mut self,
        mut block: &[u8],
        mut field: impl FnMut(Field<'_>),
    ) -> Result<(), HpackError> {
        let mut list = 0usize;
        let mut first = true;
        while let Some(&byte) = block.first() {
            if byte & 0x80 != 0 {
                // Indexed field.
                let index = integer(&mut block, 7)?;
                let (name, value) = self.lookup(index)?;
                let (name_ok, value_ok) = self.ok(index);
                list += name.len() + value.len() + ENTRY_OVERHEAD;
                if list <= self.max_list {
                    field(Field {
                        name,
                        value,
                        sensitive: false,
                        valid: name_ok && value_ok,
                    });
                }
            } else if byte & 0xe0 == 0x20 {
                // Dynamic table size update: only before the first field.
                if !first {
                    return Err(HpackError::LateTableSizeUpdate);
                }
                let size = integer(&mut block, 5)?;
                if size > self.limit {
                    return Err(HpackError::TableSizeOverLimit {
                        size,
                        limit: self.limit,
                    });
                }
                self.table.resize(size);
                continue;
            } else {
                // A literal: with incremental indexing (01), without (0000) or never indexed
                // (0001).
                let (prefix, indexing, sensitive) = match byte & 0xf0 {
                    0x00 => (4, false, false),
                    0x10 => (4, false, true),
                    _ => (6, true, false),
                };
                let index = integer(&mut block, prefix)?;
                self.scratch.clear();
                let name = match index {
                    0 => Some(string(&mut block, &mut self.scratch)?),
                    _ => None,
                };
                let value = string(&mut block, &mut self.scratch)?;
                let (name_is_ok, _) = self.ok(index);
                let Decoder { table, scratch, .. } = &*self;
                let (name_bytes, name_is_ok) = match name {
                    Some(t) => {
                        let n = text(t, scratch);
                        (n, name_ok(n))
                    }
                    None => (lookup(table, index)?.0, name_is_ok),
                };
                let value_bytes = text(value, scratch);
                let ok = (name_is_ok, value_ok(value_bytes));
                let valid = ok.0 && ok.1;
                list += name_bytes.len() + value_bytes.len() + ENTRY_OVERHEAD;
                if indexing {
                    let name_len = name_bytes.len();
                    let bytes: Box<[u8]> = [name_bytes, value_bytes].concat().into();
                    if list <= self.max_list {
                        let (name, value) = bytes.split_at(name_len);
                        field(Field {
                            name,
                            value,
                            sensitive,
                            valid,
                        });
                    }
                    self.table.insert(bytes, name_len, ok);
                } else if list <= self.max_list {
                    field(Field {
                        name: name_bytes,
                        value: value_bytes,
                        sensitive,
                        valid,
                    });
                }
            }
            first = false;
        }
        if list > self.max_list {
            return Err(HpackError::ListTooLarge {
                limit: self.max_list,
            });
        }
        Ok(())
    }

    fn lookup(&self, index: usize) -> Result<(&[u8], &[u8]), HpackError> {
        lookup(&self.table, index)
    }

    /// Whether the entry at `index` has valid name and value text (the static table's do).
    fn ok(&self, index: usize) -> (bool, bool) {
        match index.checked_sub(62) {
            Some(i) => self.table.ok(i),
            None => (true, true),
        }
    }
}

/// The entry at `index` of the static and dynamic tables together (RFC 7541 2.3.3).
fn lookup(table: &Dynamic, index: usize) -> Result<(&[u8], &[u8]), HpackError> {
    match index {
        1..=61 => Ok(STATIC[index - 1]),
        _ => index
            .checked_sub(62)
            .and_then(|i| table.get(i))
            .ok_or(HpackError::BadIndex(index)),
    }
}

fn text<'a>(t: Text<'a>, scratch: &'a [u8]) -> &'a [u8] {
    match t {
        Text::Raw(b) => b,
        Text::Decoded(from, to) => &scratch[from..to],
    }
}

/// Reads an integer with an `n`-bit prefix (RFC 7541 5.1), at most 2^28 or so: nothing larger
/// fits in a frame.
fn integer(block: &mut &[u8], n: u8) -> Result<usize, HpackError> {
    let (&first, rest) = block.split_first().ok_or(HpackError::Truncated)?;
    *block = rest;
    let max = (1usize << n) - 1;
    let mut value = usize::from(first) & max;
    if value < max {
        return Ok(value);
    }
    for shift in [0, 7, 14, 21] {
        let (&byte, rest) = block.split_first().ok_or(HpackError::Truncated)?;
        *block = rest;
        value += usize::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Ok(value);
        }
    }
    Err(HpackError::IntegerOverflow)
}

/// Reads a string literal (RFC 7541 5.2); a Huffman-coded one is decoded onto `scratch`.
fn string<'a>(block: &mut &'a [u8], scratch: &mut Vec<u8>) -> Result<Text<'a>, HpackError> {
    let huffman = block.first().is_some_and(|b| b & 0x80 != 0);
    let len = integer(block, 7)?;
    if len > block.len() {
        return Err(HpackError::Truncated);
    }
    let (bytes, rest) = block.split_at(len);
    *block = rest;
    if !huffman {
        return Ok(Text::Raw(bytes));
    }
    let from = scratch.len();
    huffman::decode(bytes, scratch)?;
    Ok(Text::Decoded(from, scratch.len()))
}

/// Writes an integer with an `n`-bit prefix; `flags` fills the bits above the prefix.
fn put_integer(dst: &mut Vec<u8>, flags: u8, n: u8, value: usize) {
    let max = (1usize << n) - 1;
    if value < max {
        dst.push(flags | value as u8);
        return;
    }
    dst.push(flags | max as u8);
    let mut rest = value - max;
    while rest >= 0x80 {
        dst.push(0x80 | (rest & 0x7f) as u8);
        rest >>= 7;
    }
    dst.push(rest as u8);
}

/// Writes a string literal as it is: Huffman coding would save a relay some bytes on loopback
/// and cost both ends CPU for every field.
fn put_string(dst: &mut Vec<u8>, s: &[u8]) {
    put_integer(dst, 0, 7, s.len());
    dst.extend_from_slice(s);
}

/// Writes header fields without touching the peer's dynamic table: a field found whole in the
/// static table is sent as its index, any other as a literal without indexing (never indexed when
/// `sensitive`), its name as a static index when it has one.
pub fn encode_field(dst: &mut Vec<u8>, name: &[u8], value: &[u8], sensitive: bool) {
    let flags = if sensitive { 0x10 } else { 0x00 };
    match static_name(name) {
        Some(first) => {
            if !sensitive {
                if let Some(index) = static_pair(first, name, value) {
                    put_integer(dst, 0x80, 7, index);
                    return;
                }
            }
            put_integer(dst, flags, 4, first);
        }
        None => {
            dst.push(flags);
            put_string(dst, name);
        }
    }
    put_string(dst, value);
}

/// Writes a dynamic table size update (RFC 7541 6.3): the first thing of a block after the peer
/// changed SETTINGS_HEADER_TABLE_SIZE, when an encoder wants to tell it the table it keeps.
pub fn encode_table_size(dst: &mut Vec<u8>, size: usize) {
    put_integer(dst, 0x20, 5, size);
}

#[cfg(test)]
mod tests;
