//! Wire codecs for fnmesh: transport detection, streaming frame decoding, in-place header
//! rewrites and reply encoders for TTHeader, Framed and unframed Thrift (Binary and Compact); and
//! for gRPC, HTTP/2 framing ([`http2`]) and header compression ([`hpack`]).
//!
//! Pure and synchronous: no I/O, no async, and no input can make it panic, overflow, or allocate
//! more than [`Limits`] allow. Payloads are never copied or re-encoded: a decoded [`Frame`] is two
//! views of the read buffer, the small `head` that a proxy may rewrite (transport header and Thrift
//! message header) and the opaque `payload` that it forwards untouched.
#![forbid(unsafe_code)]

mod detect;
mod error;
mod frame;
pub mod hpack;
pub mod http2;
mod limits;
mod message;
mod reply;
mod rewrite;
mod skip;
mod ttheader;
mod wire;

pub use detect::{detect, Detected, Detection, HTTP2_PREFACE};
pub use error::CodecError;
pub use frame::{Frame, FrameDecoder, Transport};
pub use limits::Limits;
pub use message::{is_exception, reply_kind, MessageHeader, MessageType, Protocol, ReplyKind};
pub use reply::{encode_exception, ExceptionType, ReplyTarget, FNMESH_ERROR_KEY};
pub use skip::{exception_type, skip_struct};
pub use ttheader::{
    info, int_key, str_key, wrap_call, IntKvs, StrKvs, TTHeader, TTHeaderBuilder, TTHEADER_MAGIC,
};
