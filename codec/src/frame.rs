//! The streaming frame decoder: whole frames out of a connection's read buffer, each split into a
//! small `head` (transport header and message header, which rewrites may touch) and an opaque
//! `payload`, both views of the same buffer.

use bytes::{Buf, Bytes, BytesMut};

use crate::{
    detect::{detect, Detected, Detection},
    message::{MessageHeader, MessageType, Protocol},
    skip::Walker,
    ttheader::TTHeader,
    wire::Stop,
    CodecError, Limits,
};

/// How a frame is delimited on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Transport {
    /// TTHeader; the payload may carry its own Framed length (see [`TTHeader::inner_framed`]).
    TTHeader,
    /// `u32 length` then the message.
    Framed,
    /// The message alone, delimited by walking its struct.
    Unframed,
}

/// One whole Thrift frame as received, with its parsed header view.
///
/// The head is the transport header and the message header up to the end of the name and seqid;
/// the payload is the rest (the argument or result struct), never touched. Both live in one buffer
/// taken off the read buffer with a single split; only a rewrite that resizes the head separates
/// them (the payload keeps its bytes where they are, the head gets a new small buffer).
#[derive(Debug, Clone)]
pub struct Frame {
    /// The head, followed by the payload while `joined`.
    pub(crate) buf: BytesMut,
    pub(crate) head_len: usize,
    /// The payload once a rewrite resized the head; empty while `joined`.
    pub(crate) payload: BytesMut,
    pub(crate) joined: bool,
    pub(crate) transport: Transport,
    pub(crate) ttheader: Option<TTHeader>,
    pub(crate) message: MessageHeader,
}

impl Frame {
    pub fn transport(&self) -> Transport {
        self.transport
    }

    pub fn protocol(&self) -> Protocol {
        self.message.protocol
    }

    pub fn ttheader(&self) -> Option<&TTHeader> {
        self.ttheader.as_ref()
    }

    /// The message header; its offsets are into [`Frame::head`].
    pub fn message(&self) -> &MessageHeader {
        &self.message
    }

    pub fn name(&self) -> &str {
        self.message.name(self.head())
    }

    pub fn kind(&self) -> MessageType {
        self.message.kind
    }

    pub fn seqid(&self) -> i32 {
        self.message.seqid
    }

    pub fn head(&self) -> &[u8] {
        &self.buf[..self.head_len]
    }

    pub(crate) fn head_mut(&mut self) -> &mut [u8] {
        &mut self.buf[..self.head_len]
    }

    pub fn payload(&self) -> &[u8] {
        if self.joined {
            &self.buf[self.head_len..]
        } else {
            &self.payload
        }
    }

    /// Total bytes on the wire.
    pub fn len(&self) -> usize {
        self.buf.len() + self.payload.len()
    }

    /// Replaces the head with `head`, first moving the payload out of the shared buffer.
    pub(crate) fn replace_head(&mut self, head: BytesMut) {
        if self.joined {
            self.payload = self.buf.split_off(self.head_len);
            self.joined = false;
        }
        self.head_len = head.len();
        self.buf = head;
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The head and the payload as separate buffers.
    pub fn into_parts(mut self) -> (Bytes, Bytes) {
        if self.joined {
            self.payload = self.buf.split_off(self.head_len);
        }
        (self.buf.freeze(), self.payload.freeze())
    }

    /// The whole frame, ready for a vectored write: one contiguous buffer (and an empty second
    /// part) unless a rewrite resized the head.
    pub fn into_buf(self) -> bytes::buf::Chain<Bytes, Bytes> {
        self.buf.freeze().chain(self.payload.freeze())
    }

    /// A copy of the whole frame (tests and diagnostics; the proxy path uses `into_buf`).
    pub fn to_vec(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(self.len());
        v.extend_from_slice(&self.buf);
        v.extend_from_slice(&self.payload);
        v
    }
}

/// Decodes frames from a growing read buffer. The first frame decides the transport (unless one
/// was given); later frames must use the same. After an error the connection should be closed:
/// the decoder does not resynchronise.
#[derive(Debug, Clone)]
pub struct FrameDecoder {
    limits: Limits,
    transport: Option<Detected>,
    /// Do not look again until the buffer holds this many bytes.
    need: usize,
    /// The walk of a partial unframed message, kept so that more bytes resume it.
    walk: Option<Walker>,
}

fn first4(buf: &[u8]) -> [u8; 4] {
    let mut out = [0; 4];
    for (o, b) in out.iter_mut().zip(buf) {
        *o = *b;
    }
    out
}

impl FrameDecoder {
    pub fn new(limits: Limits) -> Self {
        FrameDecoder {
            limits,
            transport: None,
            need: 0,
            walk: None,
        }
    }

    /// A decoder for a transport already detected (e.g. by the listener's sniffing).
    pub fn for_transport(detected: Detected, limits: Limits) -> Self {
        FrameDecoder {
            limits,
            transport: Some(detected),
            need: 0,
            walk: None,
        }
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// The transport, once known.
    pub fn detected(&self) -> Option<Detected> {
        self.transport
    }

    /// The buffer length below which [`FrameDecoder::decode`] will not find a frame.
    pub fn needed(&self) -> usize {
        self.need
    }

    /// Takes the next whole frame off the front of `buf`, `Ok(None)` if `buf` does not hold one
    /// yet. Bytes of a frame that is not complete stay in `buf`.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Frame>, CodecError> {
        let Some(detected) = self.transport(buf)? else {
            return Ok(None);
        };
        // Returned straight through (no local), so a frame is not copied once more per call.
        match detected {
            Detected::TTHeader => self.length_prefixed(buf, None),
            Detected::Framed(p) => self.length_prefixed(buf, Some(p)),
            Detected::Unframed(p) => self.unframed(buf, p),
            Detected::Http2 | Detected::Http1 => Err(CodecError::UnknownProtocol(first4(buf))),
        }
    }

    /// Takes the next whole frame off the front of `buf` as it is, parsing only what finding its
    /// end needs: the length prefix of a TTHeader or Framed frame (its headers are not read), or
    /// the message header and a walk of the struct of an unframed one. For relaying frames whose
    /// content nobody reads, such as an instance's replies. Same limits and waiting as
    /// [`FrameDecoder::decode`].
    pub fn split(&mut self, buf: &mut BytesMut) -> Result<Option<BytesMut>, CodecError> {
        let Some(detected) = self.transport(buf)? else {
            return Ok(None);
        };
        let framed = match detected {
            Detected::TTHeader => None,
            Detected::Framed(p) => Some(p),
            Detected::Unframed(p) => return Ok(self.unframed(buf, p)?.map(|f| f.buf)),
            Detected::Http2 | Detected::Http1 => {
                return Err(CodecError::UnknownProtocol(first4(buf)))
            }
        };
        let Some(total) = self.prefixed_len(buf, framed)? else {
            return Ok(None);
        };
        self.need = 0;
        Ok(Some(buf.split_to(total)))
    }

    /// The transport of the frames in `buf`: the one given or detected before, else detected
    /// now; `None` until `buf` holds enough to tell (or the bytes a frame needs).
    fn transport(&mut self, buf: &BytesMut) -> Result<Option<Detected>, CodecError> {
        if buf.len() < self.need || buf.is_empty() {
            return Ok(None);
        }
        match self.transport {
            Some(d) => Ok(Some(d)),
            None => match detect(buf) {
                Detection::Found(Detected::Http2 | Detected::Http1) | Detection::Unknown => {
                    Err(CodecError::UnknownProtocol(first4(buf)))
                }
                Detection::Found(d) => {
                    self.transport = Some(d);
                    Ok(Some(d))
                }
                Detection::NeedMore(n) => {
                    self.need = buf.len() + n;
                    Ok(None)
                }
            },
        }
    }

    /// The whole length of the TTHeader (`framed = None`) or Framed frame at the front of `buf`
    /// once `buf` holds all of it, after checking the length and the magic or protocol marker.
    fn prefixed_len(
        &mut self,
        buf: &[u8],
        framed: Option<Protocol>,
    ) -> Result<Option<usize>, CodecError> {
        if buf.len() < 6 {
            self.need = 6;
            return Ok(None);
        }
        let len = u64::from(u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]));
        let total = len + 4;
        if total > self.limits.max_frame_size as u64 {
            return Err(self.too_large(total));
        }
        let total = total as usize;
        match framed {
            None if buf[4..6] != crate::TTHEADER_MAGIC.to_be_bytes() => {
                return Err(CodecError::malformed("ttheader", 4, "bad magic"));
            }
            Some(_) if buf[4] != 0x80 && buf[4] != 0x82 => {
                return Err(CodecError::malformed(
                    "framed message",
                    4,
                    "no protocol marker",
                ));
            }
            _ => {}
        }
        if buf.len() < total {
            self.need = total;
            return Ok(None);
        }
        Ok(Some(total))
    }

    fn too_large(&self, size: u64) -> CodecError {
        CodecError::TooLarge {
            size,
            limit: self.limits.max_frame_size,
        }
    }

    /// TTHeader (`framed = None`) and Framed frames: a u32 length says where the frame ends.
    fn length_prefixed(
        &mut self,
        buf: &mut BytesMut,
        framed: Option<Protocol>,
    ) -> Result<Option<Frame>, CodecError> {
        let Some(total) = self.prefixed_len(buf, framed)? else {
            return Ok(None);
        };
        let frame = &buf[..total];
        let (ttheader, message) = match framed {
            None => {
                let h = complete(TTHeader::parse(frame, &self.limits), "ttheader")?;
                if !h.transforms(frame).is_empty() {
                    return Err(CodecError::malformed(
                        "ttheader",
                        crate::ttheader::FIXED_LEN + 1,
                        "payload transforms are not supported",
                    ));
                }
                let start = h.message_start();
                let m = MessageHeader::parse(frame, start, Some(h.protocol), &self.limits);
                (Some(h), complete(m, "message header")?)
            }
            Some(p) => {
                let m = MessageHeader::parse(frame, 4, Some(p), &self.limits);
                (None, complete(m, "message header")?)
            }
        };
        self.need = 0;
        Ok(Some(Frame {
            buf: buf.split_to(total),
            head_len: message.end,
            payload: BytesMut::new(),
            joined: true,
            transport: if ttheader.is_some() {
                Transport::TTHeader
            } else {
                Transport::Framed
            },
            ttheader,
            message,
        }))
    }

    fn unframed(
        &mut self,
        buf: &mut BytesMut,
        protocol: Protocol,
    ) -> Result<Option<Frame>, CodecError> {
        let message = match MessageHeader::parse(buf, 0, Some(protocol), &self.limits) {
            Ok(m) => m,
            Err(stop) => return self.wait_or_fail(stop),
        };
        // Resumed where the last read left it: a message dripped a byte at a time is walked
        // once, not again from its start on every read.
        let walk = self.walk.get_or_insert_with(|| Walker::new(message.end));
        let end = match walk.resume(buf, message.protocol, &self.limits) {
            Ok(end) => end,
            Err(stop) => return self.wait_or_fail(stop),
        };
        self.walk = None;
        if end > self.limits.max_frame_size {
            return Err(self.too_large(end as u64));
        }
        self.need = 0;
        Ok(Some(Frame {
            buf: buf.split_to(end),
            head_len: message.end,
            payload: BytesMut::new(),
            joined: true,
            transport: Transport::Unframed,
            ttheader: None,
            message,
        }))
    }

    fn wait_or_fail(&mut self, stop: Stop) -> Result<Option<Frame>, CodecError> {
        match stop {
            Stop::Invalid(e) => Err(e),
            Stop::Incomplete(n) if n > self.limits.max_frame_size => Err(self.too_large(n as u64)),
            Stop::Incomplete(n) => {
                self.need = n;
                Ok(None)
            }
        }
    }
}

/// Inside a frame whose length is known, running out of bytes means the frame lied.
fn complete<T>(r: Result<T, Stop>, what: &'static str) -> Result<T, CodecError> {
    r.map_err(|stop| match stop {
        Stop::Invalid(e) => e,
        Stop::Incomplete(at) => CodecError::malformed(what, at, "runs past the end of the frame"),
    })
}
