//! In-place rewrites a proxy makes to a frame's head: the seqid, a TMultiplexedProtocol name
//! prefix, one TTHeader int key. The payload is never touched. A rewrite that keeps the head's
//! size writes into it directly (no allocation); one that resizes it builds a new head, copying
//! only header bytes.

use bytes::{BufMut, BytesMut};

use crate::{
    frame::{Frame, Transport},
    message::{MessageHeader, Protocol},
    ttheader::{info, write_header, TTHeader},
    wire::{put_varint, put_varint_fixed},
    CodecError, Limits,
};

/// Limits for re-parsing a head fnmesh built itself: it was valid before the rewrite.
const REPARSE: Limits = Limits {
    max_frame_size: usize::MAX,
    max_header_size: usize::MAX,
    max_name_len: usize::MAX,
    max_depth: 0,
};

fn put_u32_at(buf: &mut [u8], at: usize, v: u32) {
    if let Some(slot) = buf.get_mut(at..at + 4) {
        slot.copy_from_slice(&v.to_be_bytes());
    }
}

fn get_u32_at(buf: &[u8], at: usize) -> u32 {
    match buf.get(at..at + 4) {
        Some(&[a, b, c, d]) => u32::from_be_bytes([a, b, c, d]),
        _ => 0,
    }
}

impl Frame {
    /// Sets the seqid in the message header and, for TTHeader, in the TTHeader too.
    pub fn set_seqid(&mut self, seqid: i32) -> Result<(), CodecError> {
        if self.ttheader.is_some() {
            put_u32_at(self.head_mut(), 8, seqid as u32);
        }
        if let Some(h) = self.ttheader.as_mut() {
            h.seqid = seqid as u32;
        }
        let m = self.message;
        match m.protocol {
            Protocol::Binary => put_u32_at(self.head_mut(), m.seqid_at, seqid as u32),
            Protocol::Compact => {
                let slot = &mut self.head_mut()[m.seqid_at..m.seqid_at + m.seqid_width];
                if !put_varint_fixed(slot, seqid as u32) {
                    // Wider than the old varint: rebuild the head with the new width.
                    let mut varint = BytesMut::with_capacity(5);
                    put_varint(&mut varint, u64::from(seqid as u32));
                    self.resize_message(m.seqid_at, m.seqid_width, &varint)?;
                }
            }
        }
        self.message.seqid = seqid;
        Ok(())
    }

    /// Strips a TMultiplexedProtocol `Service:` prefix from the message name, fixing every
    /// length. Returns the service name that was stripped, if there was one.
    pub fn strip_service_prefix(&mut self) -> Result<Option<String>, CodecError> {
        let name = self.name();
        let Some(colon) = name.find(':') else {
            return Ok(None);
        };
        let service = name[..colon].to_owned();
        let m = self.message;
        let new_len = m.name_end - m.name_start - (colon + 1);
        let mut field = BytesMut::with_capacity(5);
        let len_at = match m.protocol {
            Protocol::Binary => {
                field.put_u32(new_len as u32);
                m.name_start - 4
            }
            Protocol::Compact => {
                put_varint(&mut field, new_len as u64);
                m.seqid_at + m.seqid_width
            }
        };
        let remove = m.name_start - len_at + colon + 1;
        self.resize_message(len_at, remove, &field)?;
        Ok(Some(service))
    }

    /// Overwrites, in place, the value of the first TTHeader string key that `key` accepts and
    /// whose value is as long as `value` (a W3C `traceparent` keeps its length); gives whether
    /// one was.
    pub fn overwrite_str_value(&mut self, key: impl Fn(&[u8]) -> bool, value: &[u8]) -> bool {
        let Some(h) = self.ttheader else {
            return false;
        };
        let head = self.head();
        let base = head.as_ptr() as usize;
        let at = h
            .str_kvs(head)
            .find(|(k, v)| key(k) && v.len() == value.len())
            .map(|(_, v)| v.as_ptr() as usize - base);
        match at {
            Some(at) => {
                self.head_mut()[at..at + value.len()].copy_from_slice(value);
                true
            }
            None => false,
        }
    }

    /// Adds the TTHeader string key `key` with `value`, in a key/value block of its own after
    /// the others; every other byte of the header is kept. For a key the frame does not carry
    /// (replace one with [`Frame::overwrite_str_value`]).
    pub fn add_str_key(&mut self, key: &[u8], value: &[u8]) -> Result<(), CodecError> {
        let Some(h) = self.ttheader else {
            return Err(CodecError::Unencodable {
                what: "string key",
                reason: "the frame has no TTHeader",
            });
        };
        let long = |what| CodecError::Unencodable {
            what,
            reason: "longer than a u16 length allows",
        };
        let klen = u16::try_from(key.len()).map_err(|_| long("string key"))?;
        let vlen = u16::try_from(value.len()).map_err(|_| long("string value"))?;
        let (i_start, i_end) = h.info_span();
        let mut info = BytesMut::with_capacity(i_end - i_start + key.len() + value.len() + 8);
        info.put_slice(&self.head()[i_start..i_end]);
        info.put_u8(info::KEY_VALUE);
        info.put_u16(1);
        info.put_u16(klen);
        info.put_slice(key);
        info.put_u16(vlen);
        info.put_slice(value);
        self.rewrite_header(&h, &info)
    }

    /// Sets TTHeader int key `key` to `value`, replacing it if present, adding it if not; every
    /// other key is kept byte for byte. In place when the value keeps its length.
    pub fn set_int_key(&mut self, key: u16, value: &[u8]) -> Result<(), CodecError> {
        let Some(h) = self.ttheader else {
            return Err(CodecError::Unencodable {
                what: "int key",
                reason: "the frame has no TTHeader",
            });
        };
        if value.len() > usize::from(u16::MAX) {
            return Err(CodecError::Unencodable {
                what: "int value",
                reason: "longer than a u16 length allows",
            });
        }
        let mut spans = h.int_kv_spans(self.head()).filter(|(k, _, _)| *k == key);
        if let (Some((_, start, end)), None) = (spans.next(), spans.next()) {
            if end - start == value.len() {
                self.head_mut()[start..end].copy_from_slice(value);
                return Ok(());
            }
        }
        let info = rebuild_info(self.head(), &h, key, value)?;
        self.rewrite_header(&h, &info)
    }

    /// Writes the TTHeader `h` again with `info` as its info section (flags, seqid, protocol
    /// and transforms kept), the message after it as it was, and re-reads the head.
    fn rewrite_header(&mut self, h: &TTHeader, info: &[u8]) -> Result<(), CodecError> {
        let (t_start, t_end) = h.transforms_span();
        let message_start = h.message_start();
        let message_len = self.len() - message_start;
        let mut head = BytesMut::with_capacity(message_start + info.len() + 16);
        write_header(
            &mut head,
            h.flags,
            h.seqid,
            h.protocol.ttheader_id(),
            &self.head()[t_start..t_end],
            info,
            h.inner_framed,
            message_len,
        )?;
        head.put_slice(&self.head()[message_start..]);
        self.replace_head(head);
        self.reparse()
    }

    /// Replaces `remove` bytes at `at` (inside the message header) with `insert`, fixing the frame
    /// lengths, then re-reads the head.
    fn resize_message(
        &mut self,
        at: usize,
        remove: usize,
        insert: &[u8],
    ) -> Result<(), CodecError> {
        let old_len = self.len();
        let new_len = old_len - remove + insert.len();
        let old_head = self.head();
        let mut head = BytesMut::with_capacity(old_head.len() - remove + insert.len());
        head.put_slice(&old_head[..at]);
        head.put_slice(insert);
        head.put_slice(&old_head[at + remove..]);
        let too_long = CodecError::Unencodable {
            what: "frame length",
            reason: "over 4 GiB",
        };
        match (self.transport, self.ttheader) {
            (Transport::TTHeader, Some(h)) => {
                put_u32_at(
                    &mut head,
                    0,
                    u32::try_from(new_len - 4).map_err(|_| too_long)?,
                );
                if h.inner_framed {
                    let inner = get_u32_at(&head, h.header_end) as usize;
                    let inner = (inner + insert.len()).saturating_sub(remove);
                    put_u32_at(
                        &mut head,
                        h.header_end,
                        u32::try_from(inner).map_err(|_| too_long)?,
                    );
                }
            }
            (Transport::Framed, _) => put_u32_at(
                &mut head,
                0,
                u32::try_from(new_len - 4).map_err(|_| too_long)?,
            ),
            _ => {}
        }
        self.replace_head(head);
        self.reparse()
    }

    /// Re-reads the views after the head was rebuilt.
    fn reparse(&mut self) -> Result<(), CodecError> {
        let incomplete = |what| CodecError::malformed(what, 0, "rewritten head is incomplete");
        let (ttheader, start) = match self.ttheader {
            Some(old) => {
                let mut h =
                    TTHeader::parse(self.head(), &REPARSE).map_err(|_| incomplete("ttheader"))?;
                h.inner_framed = old.inner_framed;
                (Some(h), h.message_start())
            }
            None => (None, self.message.start),
        };
        let hint = Some(self.message.protocol);
        let message = MessageHeader::parse(self.head(), start, hint, &REPARSE)
            .map_err(|_| incomplete("message header"))?;
        self.ttheader = ttheader;
        self.message = message;
        Ok(())
    }
}

/// The info blocks of `h` with int key `key` set to `value`: the first occurrence replaced, later
/// ones dropped, or the key added to the first int block (or a new one). Padding is dropped; the
/// header writer pads again.
fn rebuild_info(head: &[u8], h: &TTHeader, key: u16, value: &[u8]) -> Result<BytesMut, CodecError> {
    let (start, end) = h.info_span();
    let region = &head[..end];
    let mut out = BytesMut::with_capacity(end - start + value.len() + 8);
    let mut pos = start;
    let mut placed = false;
    let u16_at = |p: usize| -> Result<usize, CodecError> {
        match region.get(p..p + 2) {
            Some(&[a, b]) => Ok(usize::from(u16::from_be_bytes([a, b]))),
            _ => Err(CodecError::malformed(
                "ttheader",
                p,
                "info block runs past the header size",
            )),
        }
    };
    while pos < end {
        let id = region[pos];
        pos += 1;
        match id {
            info::PADDING => {}
            info::KEY_VALUE => {
                let block_start = pos - 1;
                let n = u16_at(pos)?;
                pos += 2;
                for _ in 0..n {
                    pos += 2 + u16_at(pos)?;
                    pos += 2 + u16_at(pos)?;
                }
                out.put_slice(&region[block_start..pos.min(end)]);
            }
            info::ACL_TOKEN => {
                let block_start = pos - 1;
                pos += 2 + u16_at(pos)?;
                out.put_slice(&region[block_start..pos.min(end)]);
            }
            info::INT_KEY_VALUE => {
                let n = u16_at(pos)?;
                pos += 2;
                let count_at = out.len() + 1;
                out.put_u8(info::INT_KEY_VALUE);
                out.put_u16(0);
                let mut count: u32 = 0;
                for _ in 0..n {
                    let k = u16_at(pos)?;
                    let vlen = u16_at(pos + 2)?;
                    let entry_end = pos + 4 + vlen;
                    if k as u16 == key {
                        if !placed {
                            put_int_kv(&mut out, key, value);
                            placed = true;
                            count += 1;
                        }
                    } else {
                        out.put_slice(region.get(pos..entry_end).unwrap_or(&[]));
                        count += 1;
                    }
                    pos = entry_end;
                }
                if !placed {
                    put_int_kv(&mut out, key, value);
                    placed = true;
                    count += 1;
                }
                let count = u16::try_from(count).map_err(|_| CodecError::Unencodable {
                    what: "int key/value count",
                    reason: "over 65535",
                })?;
                out[count_at..count_at + 2].copy_from_slice(&count.to_be_bytes());
            }
            _ => {
                return Err(CodecError::malformed(
                    "ttheader",
                    pos - 1,
                    "unknown info id",
                ))
            }
        }
    }
    if !placed {
        out.put_u8(info::INT_KEY_VALUE);
        out.put_u16(1);
        put_int_kv(&mut out, key, value);
    }
    Ok(out)
}

fn put_int_kv(out: &mut BytesMut, key: u16, value: &[u8]) {
    out.put_u16(key);
    out.put_u16(value.len() as u16);
    out.put_slice(value);
}
