//! Replies fnmesh makes itself: a TApplicationException EXCEPTION message in the transport and
//! protocol of the request it answers, tagged with TTHeader string key `fnmesh-error`.

use std::borrow::Cow;

use bytes::{BufMut, Bytes, BytesMut};

use crate::{
    detect::Detected,
    frame::{Frame, Transport},
    message::{MessageHeader, MessageType, Protocol},
    ttheader::TTHeaderBuilder,
    wire::{put_varint, zigzag32},
    CodecError,
};

/// The TTHeader string key naming the kind of an error fnmesh made (`no-route`, `timeout`...).
pub const FNMESH_ERROR_KEY: &str = "fnmesh-error";

/// TApplicationException types (Apache Thrift numbering).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ExceptionType {
    Unknown = 0,
    UnknownMethod = 1,
    InvalidMessageType = 2,
    WrongMethodName = 3,
    BadSequenceId = 4,
    MissingResult = 5,
    InternalError = 6,
    ProtocolError = 7,
}

/// What a reply must match of the request it answers. It borrows the request's name, or owns a
/// copy ([`ReplyTarget::into_owned`]) when the request itself is sent on before the reply is known.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplyTarget<'a> {
    pub transport: Transport,
    pub protocol: Protocol,
    /// Binary only: the old non-strict header form.
    pub strict: bool,
    pub name: Cow<'a, str>,
    pub seqid: i32,
    /// TTHeader only: flags and seqid of the request's TTHeader, and whether its payload carried
    /// a Framed length.
    pub tt_flags: u16,
    pub tt_seqid: u32,
    pub inner_framed: bool,
}

impl<'a> ReplyTarget<'a> {
    /// The reply target for a decoded request.
    pub fn of(frame: &'a Frame) -> Self {
        let tt = frame.ttheader();
        ReplyTarget {
            transport: frame.transport(),
            protocol: frame.protocol(),
            strict: frame.message().strict,
            name: Cow::Borrowed(frame.name()),
            seqid: frame.seqid(),
            tt_flags: tt.map_or(0, |h| h.flags),
            tt_seqid: tt.map_or(0, |h| h.seqid),
            inner_framed: tt.is_some_and(|h| h.inner_framed),
        }
    }

    /// A reply target when the request itself could not be decoded: only the transport is known
    /// (a TTHeader request is answered the way Volo frames it, binary with a Framed length).
    pub fn for_detected(detected: Detected) -> ReplyTarget<'static> {
        let (transport, protocol) = match detected {
            Detected::TTHeader | Detected::Http2 | Detected::Http1 => {
                (Transport::TTHeader, Protocol::Binary)
            }
            Detected::Framed(p) => (Transport::Framed, p),
            Detected::Unframed(p) => (Transport::Unframed, p),
        };
        ReplyTarget {
            transport,
            protocol,
            strict: true,
            name: Cow::Borrowed(""),
            seqid: 0,
            tt_flags: 0,
            tt_seqid: 0,
            inner_framed: transport == Transport::TTHeader,
        }
    }
}

impl ReplyTarget<'_> {
    /// The same target, independent of the request's buffer.
    pub fn into_owned(self) -> ReplyTarget<'static> {
        ReplyTarget {
            name: Cow::Owned(self.name.into_owned()),
            ..self
        }
    }
}

/// Encodes an EXCEPTION reply carrying a TApplicationException of type `ty` with `message`.
/// `error_kind`, when given, goes into TTHeader string key `fnmesh-error`.
pub fn encode_exception(
    target: &ReplyTarget<'_>,
    ty: ExceptionType,
    message: &str,
    error_kind: Option<&str>,
) -> Result<Bytes, CodecError> {
    let mut body = BytesMut::with_capacity(32 + target.name.len() + message.len());
    MessageHeader::encode(
        &mut body,
        target.protocol,
        target.strict,
        MessageType::Exception,
        &target.name,
        target.seqid,
    );
    match target.protocol {
        Protocol::Binary => {
            body.put_u8(11);
            body.put_i16(1);
            body.put_u32(message.len() as u32);
            body.put_slice(message.as_bytes());
            body.put_u8(8);
            body.put_i16(2);
            body.put_i32(ty as i32);
            body.put_u8(0);
        }
        Protocol::Compact => {
            body.put_u8(0x18);
            put_varint(&mut body, message.len() as u64);
            body.put_slice(message.as_bytes());
            body.put_u8(0x15);
            put_varint(&mut body, zigzag32(ty as i32));
            body.put_u8(0);
        }
    }
    let mut out = BytesMut::with_capacity(body.len() + 64);
    match target.transport {
        Transport::TTHeader => {
            let mut builder = TTHeaderBuilder {
                flags: target.tt_flags,
                seqid: target.tt_seqid,
                protocol: Some(target.protocol),
                inner_framed: target.inner_framed,
                ..TTHeaderBuilder::default()
            };
            if let Some(kind) = error_kind {
                builder
                    .str_kvs
                    .push((FNMESH_ERROR_KEY.as_bytes(), kind.as_bytes()));
            }
            builder.encode(&mut out, body.len())?;
        }
        Transport::Framed => {
            let len = u32::try_from(body.len()).map_err(|_| CodecError::Unencodable {
                what: "frame length",
                reason: "over 4 GiB",
            })?;
            out.put_u32(len);
        }
        Transport::Unframed => {}
    }
    out.put_slice(&body);
    Ok(out.freeze())
}
